"""The published ProText hyper-parameters (PRESETS.md) as data.

A preset is named ``cross_dataset``, ``text_only/<dataset>`` or ``base2novel/<dataset>``. Only
``n_ctx``, ``lr``, ``epochs`` and the CuPL description file differ between presets; everything else
is common to all of them and lives in the :class:`Preset` defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

from .classlists import BUILTIN_FILES
from .errors import UserError
from .templates import DEFAULT_TEMPLATE, PROTEXT_TEMPLATES, template_for  # noqa: F401  (DEFAULT_TEMPLATE re-exported)

DATASETS = (
    "imagenet",
    "caltech101",
    "dtd",
    "eurosat",
    "fgvc_aircraft",
    "food101",
    "oxford_flowers",
    "oxford_pets",
    "stanford_cars",
    "sun397",
    "ucf101",
)

CUPL_FILES = {
    "imagenet": "imagenet_prompts_base.json",
    "caltech101": "cal_prompts_full.json",
    "dtd": "texture_prompts_full.json",
    "eurosat": "eurosat_prompts_full.json",
    "fgvc_aircraft": "airplane_prompts_full.json",
    "food101": "food_prompts_full.json",
    "oxford_flowers": "flower_prompts_full.json",
    "oxford_pets": "pets_prompts_full.json",
    "stanford_cars": "cars_prompts_full.json",
    "sun397": "sun_prompts_full.json",
    "ucf101": "ucf_prompts_full.json",
}
"""The CuPL description file of each dataset, as named in CuPL's release folder."""

CLASSNAME_FILES = BUILTIN_FILES
"""The class-name list (label order) of each dataset, as shipped in ``protext/data/classnames/``
(read by its dataset name: ``read_classes("dtd")``)."""

CROSS_DATASET_TEMPLATES = PROTEXT_TEMPLATES
"""Class prompts for ImageNet-trained prompts evaluated elsewhere (one copy: :mod:`protext.templates`)."""


def cross_dataset_template(dataset: str) -> str:
    """The template that prompts trained on ImageNet use on ``dataset`` (PRESETS.md)."""
    return template_for(dataset, "protext")


@dataclass(frozen=True)
class Preset:
    """One published training setting; the defaults are what every preset shares.

    Attributes:
        name: ``cross_dataset``, ``text_only/<dataset>`` or ``base2novel/<dataset>``.
        setting: ``cross_dataset``, ``text_only`` or ``base2novel``.
        dataset: the dataset whose descriptions are trained on.
        n_ctx: number of context vectors.
        lr: base learning rate of the cosine schedule.
        epochs: number of epochs, warm-up included.
        cupl_file: the CuPL description file (in CuPL's release folder).
        classnames_file: the label-ordered class list (shipped in ``protext/data/classnames/``).
        split: ``base`` for base-to-novel (train on the first ceil(n/2) labels of ``dataset``'s shipped
            class list unless ``--classes`` names another), else ``all``.
    """

    name: str
    setting: str
    dataset: str
    n_ctx: int
    lr: float
    epochs: int
    cupl_file: str
    classnames_file: str
    split: str = "all"
    depth: int = 9
    batch_size: int = 256
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    ctx_init: Optional[str] = "a photo of a"
    template: str = "{}."
    loss: str = "mse"
    loss_weight: float = 1000.0
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.1

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (for checkpoint metadata)."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out


# (dataset, n_ctx, lr, epochs) rows of PRESETS.md
_TEXT_ONLY = [
    ("imagenet", 16, 0.0025, 200),
    ("caltech101", 16, 0.03, 30),
    ("dtd", 16, 0.03, 200),
    ("eurosat", 4, 0.0025, 300),
    ("fgvc_aircraft", 4, 0.03, 200),
    ("food101", 16, 0.03, 30),
    ("oxford_flowers", 4, 0.0025, 300),
    ("oxford_pets", 4, 0.03, 50),
    ("stanford_cars", 8, 0.03, 20),
    ("sun397", 16, 0.03, 150),
    ("ucf101", 8, 0.0025, 100),
]
_BASE2NOVEL = [
    ("imagenet", 4, 0.03, 30),
    ("caltech101", 16, 0.0025, 30),
    ("dtd", 4, 0.03, 200),
    ("eurosat", 16, 0.0025, 30),
    ("fgvc_aircraft", 4, 0.03, 200),
    ("food101", 8, 0.0025, 50),
    ("oxford_flowers", 4, 0.0025, 150),
    ("oxford_pets", 4, 0.03, 50),
    ("stanford_cars", 8, 0.0025, 30),
    ("sun397", 8, 0.03, 30),
    ("ucf101", 16, 0.03, 30),
]


def _build() -> dict[str, Preset]:
    presets = {
        "cross_dataset": Preset(
            "cross_dataset", "cross_dataset", "imagenet", 4, 0.03, 10, CUPL_FILES["imagenet"], CLASSNAME_FILES["imagenet"]
        )
    }
    for setting, rows, split in (("text_only", _TEXT_ONLY, "all"), ("base2novel", _BASE2NOVEL, "base")):
        for dataset, n_ctx, lr, epochs in rows:
            name = f"{setting}/{dataset}"
            presets[name] = Preset(
                name, setting, dataset, n_ctx, lr, epochs, CUPL_FILES[dataset], CLASSNAME_FILES[dataset], split
            )
    return presets


PRESETS: dict[str, Preset] = _build()

DEFAULT_PRESET = "cross_dataset"
"""Where ``n_ctx``, ``lr`` and ``epochs`` come from when no preset is named."""


class PresetError(UserError, KeyError):
    """An unknown preset name or an out-of-range override; the message names the flag."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises :class:`PresetError` (a ``KeyError``) listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(PRESETS)
        raise PresetError(f"--preset: unknown preset '{name}'; known presets: {known}") from None


#: the settings a command-line flag (``--n-ctx`` for ``n_ctx``) may override
OVERRIDABLE = ("n_ctx", "depth", "ctx_init", "lr", "epochs", "warmup_epochs", "batch_size", "loss", "loss_weight", "split")
LOSS_WEIGHTS = {"mse": 1000.0, "l1": 1.0}
"""The published loss factors: MSE × 1000, L1 unweighted."""


@dataclass(frozen=True)
class Settings:
    """A preset with the user's overrides applied: every value a training run needs.

    ``ctx_init`` None means a random context; ``preset`` is None when no preset was named (the
    values then come from :data:`DEFAULT_PRESET`, and ``split`` is ``all``).
    """

    preset: Optional[str]
    n_ctx: int
    depth: int
    ctx_init: Optional[str]
    template: str
    split: str
    lr: float
    epochs: int
    warmup_epochs: int
    warmup_lr: float
    batch_size: int
    loss: str
    loss_weight: float
    betas: tuple[float, float]
    weight_decay: float
    preset_values: dict[str, Any] = field(default_factory=dict)

    @property
    def trains_nothing(self) -> bool:
        """True when every epoch is a warm-up epoch: the cosine schedule never starts."""
        return self.epochs <= self.warmup_epochs


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_ranges(values: Mapping[str, Any]) -> None:
    for key in ("n_ctx", "depth", "epochs", "batch_size"):
        if values[key] < 1:
            raise PresetError(f"{_flag(key)} must be at least 1, got {values[key]}.")
    if values["warmup_epochs"] < 0:
        raise PresetError(f"--warmup-epochs must be 0 or more, got {values['warmup_epochs']}.")
    for key in ("lr", "loss_weight"):
        if not values[key] > 0:
            raise PresetError(f"{_flag(key)} must be positive, got {values[key]}.")
    if values["loss"] not in LOSS_WEIGHTS:
        raise PresetError(f"--loss must be one of {', '.join(LOSS_WEIGHTS)}, got '{values['loss']}'.")
    if values["split"] not in ("all", "base", "novel"):
        raise PresetError(f"--split must be all, base or novel, got '{values['split']}'.")


def resolve(preset: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> Settings:
    """The named preset (or :data:`DEFAULT_PRESET`'s values) with every non-None override applied.

    ``overrides`` takes the keys of :data:`OVERRIDABLE`. A ``ctx_init`` of ``none`` or ``""`` means a
    random context. Changing ``loss`` without ``loss_weight`` takes that loss's published factor.
    ``split`` defaults to the preset's (``base`` for ``base2novel/*``), or ``all`` without a preset.

    Raises:
        PresetError: unknown preset or override key, or a value out of range (named by its flag).
    """
    base = get_preset(preset or DEFAULT_PRESET)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OVERRIDABLE))
    if unknown:
        raise PresetError(f"cannot override {', '.join(unknown)}; overridable: {', '.join(OVERRIDABLE)}.")
    values = {key: getattr(base, key) for key in OVERRIDABLE}
    values["split"] = base.split if preset else "all"
    if "loss" in given and "loss_weight" not in given:
        values["loss_weight"] = LOSS_WEIGHTS.get(given["loss"], base.loss_weight)
    values.update(given)
    ctx_init = values["ctx_init"]
    if ctx_init is not None and ctx_init.strip().lower() in ("", "none"):
        values["ctx_init"] = None
    _check_ranges(values)
    return Settings(
        preset=preset, template=base.template, warmup_lr=base.warmup_lr, betas=base.betas, weight_decay=base.weight_decay,
        preset_values=base.as_dict() if preset else {}, **values,
    )
