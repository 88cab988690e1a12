"""Which sentence a class name goes into: the three template rules behind the published numbers.

The papers this toolkit reproduces use three different rules, and all three are legitimate; a
result must say which one it used (``../shared/design/PUBLISHED.md``):

- ``protext``: ProText's templates (PRESETS.md, "Cross-dataset templates"). Learned prompts put
  their context in place of the leading "a photo of a" (:data:`CONTEXT_PHRASE`).
- ``coop``: CoOp's one template per dataset, used by the CLIP rows of the ProText tables. They
  differ from ProText's on DTD, EuroSAT, Food101 and UCF101.
- ``tpt``: ``a photo of a {}.`` on every dataset: TPT's protocol and its CLIP baseline.

Over the rules sits one policy, :func:`choose_template`: prompts evaluated on the dataset they were
trained on keep their training template. The evaluation (from a checkpoint's metadata) and the
table planner (from a preset) both ask it, so the two can never decide differently.

Class features can also average a fixed list of templates (:data:`TEMPLATE_ENSEMBLES`, the
``--method`` values of those ensembles): ZERO+Ensemble's seven (``ensemble``) or CLIP's 80 ImageNet
templates (``ensemble80``, TDA's class features on ImageNet-R and -Sketch, TTA.md §3.7).

Dataset keys are the canonical names of :mod:`protext.datasets` (``oxford_pets``, ``imagenet_a``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

#: the template rules, in the order the docs list them
TEMPLATE_RULES = ("protext", "coop", "tpt")

#: the phrase that hand-crafted and learned context vectors stand for
CONTEXT_PHRASE = "a photo of a"

DEFAULT_TEMPLATE = "a photo of a {}."

PROTEXT_TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "a photo of a {}, a type of a texture.",
    "eurosat": "a photo of a centered satellite photo of {}.",
    "food101": "a photo of a {}, a type of food.",
}
"""ProText's templates (PRESETS.md); every other dataset uses :data:`DEFAULT_TEMPLATE`."""

COOP_TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "food101": "a photo of {}, a type of food.",
    "ucf101": "a photo of a person doing {}.",
}
"""CoOp's per-dataset templates (PUBLISHED.md, ProText's CLIP rows); the rest use :data:`DEFAULT_TEMPLATE`."""

_RULES = {"protext": PROTEXT_TEMPLATES, "coop": COOP_TEMPLATES, "tpt": {}}


def template_for(dataset: str, rule: str = "protext") -> str:
    """The template ``rule`` gives ``dataset`` (a canonical dataset name); ``{}`` marks the class name."""
    if rule not in _RULES:
        from .errors import UserError

        raise UserError(f"--templates must be one of {', '.join(TEMPLATE_RULES)}, got {rule!r}")
    return _RULES[rule].get(dataset, DEFAULT_TEMPLATE)


#: :attr:`TemplateDecision.source` when prompts on their own training dataset keep their training template
FROM_TRAINING = "training"
#: :attr:`TemplateDecision.source` when the template rule gives the template
FROM_RULE = "rule"


@dataclass(frozen=True)
class TemplateDecision:
    """The template a set of class features is built with, and which part of the policy chose it."""

    template: str
    source: str  # FROM_TRAINING or FROM_RULE; each caller words it for its own records


def choose_template(
    dataset: str,
    rule: str = "protext",
    *,
    trained_on: Optional[str] = None,
    training_template: Optional[str] = None,
    aliases: Iterable[str] = (),
) -> TemplateDecision:
    """THE template policy of an evaluation and of a table cell (ProText's in-domain protocol).

    Prompts evaluated on the dataset they were trained on keep their training template; everything
    else (other datasets, no prompts at all) takes ``rule``'s template for ``dataset``.

    Args:
        dataset: the canonical name of the dataset the class features are for.
        rule: the template rule (:data:`TEMPLATE_RULES`).
        trained_on: the dataset the prompts were trained on; None when no learned prompts are used
            or their training dataset is unknown.
        training_template: the prompts' training template, written the way the caller records it
            (a checkpoint's ``{}.``, a table's ``a photo of a {}.``); None or empty when unknown.
        aliases: other names the evaluated dataset goes by (the name a user typed).

    Raises:
        UserError: ``rule`` is not a template rule and the rule's template is needed.
    """
    if trained_on and training_template and trained_on in (dataset, *aliases):
        return TemplateDecision(str(training_template), FROM_TRAINING)
    return TemplateDecision(template_for(dataset, rule), FROM_RULE)


TEMPLATE_ENSEMBLES = ("ensemble", "ensemble80")
"""Class features that average a fixed template list, by ``--method`` value: ``ensemble`` is
ZERO+Ensemble's seven templates (TTA.md §1.6), ``ensemble80`` CLIP's 80 ImageNet templates."""

#: how many templates CLIP's ImageNet ensemble has (the CLIP paper's prompt-engineering notebook)
OPENAI_TEMPLATE_COUNT = 80


def _as_template(entry: Union[str, Callable[[str], str]]) -> str:
    """One open_clip template (a ``lambda c: f"... {c} ..."`` or a string) as a ``{}`` string."""
    text = entry if isinstance(entry, str) else entry("{}")
    if not isinstance(text, str) or text.count("{}") != 1:
        raise ValueError(f"open_clip template {entry!r} does not give one '{{}}' for the class name: {text!r}")
    return text


def templates_from_open_clip(entries: Sequence[Union[str, Callable[[str], str]]]) -> tuple[str, ...]:
    """open_clip's template entries (callables or strings) as ``{}`` strings, in their order."""
    return tuple(_as_template(entry) for entry in entries)


def openai_imagenet_templates() -> tuple[str, ...]:
    """CLIP's 80 ImageNet templates as ``{}`` strings, in CLIP's order.

    They ship with open_clip (``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``), the same
    list and order as TDA's ``imagenet_templates`` (TTA.md §3.7), so protext keeps no copy.

    Raises:
        RuntimeError: the installed open_clip has no such list, or not 80 of them.
    """
    try:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    except ImportError as err:  # pragma: no cover - open_clip is a dependency
        raise RuntimeError(f"open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES is not available: {err}") from None
    templates = templates_from_open_clip(OPENAI_IMAGENET_TEMPLATES)
    if len(templates) != OPENAI_TEMPLATE_COUNT:
        raise RuntimeError(
            f"open_clip's OPENAI_IMAGENET_TEMPLATES holds {len(templates)} templates, not CLIP's {OPENAI_TEMPLATE_COUNT}."
        )
    return templates


ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
"""ZERO+Ensemble's seven templates, for every dataset: class feature ``norm(mean_k norm(text_k))``."""


def ensemble_templates(name: str) -> tuple[str, ...]:
    """The templates a :data:`TEMPLATE_ENSEMBLES` method averages (``ensemble`` or ``ensemble80``)."""
    if name == "ensemble":
        return ENSEMBLE_TEMPLATES
    if name == "ensemble80":
        return openai_imagenet_templates()
    raise ValueError(f"unknown template ensemble {name!r}; expected one of {', '.join(TEMPLATE_ENSEMBLES)}")
