"""What a test-time method's declaration is made of: :func:`option` fields, :class:`Method`,
:class:`ViewRecipe`, and :func:`register`, which each ``protext/tta/methods/NAME.py`` calls once.

The lookups over the declared methods (``names``, ``get``, ``resolve``, ``check_given``, ``record``)
are :mod:`protext.tta.registry`, which imports every declaration; the declarations import only this
module, so the registry stands above them and nothing loops. No torch here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

from ..errors import UserError


class TTAConfigError(UserError, ValueError):
    """A test-time adaptation setting is out of range or does not fit the method (names the flag)."""


NO_DEFAULT = object()
"""A per-dataset table's fallback when the method has no published value for other datasets."""


@dataclass(frozen=True)
class Context:
    """What a method's defaults and checks may depend on besides its own settings.

    Attributes:
        dataset: the canonical dataset key (``imagenet_a``; a plain folder keeps its own name).
        dataset_name: the name as the user wrote it (for messages).
        fp16: whether the run uses fp16 autocast (some combinations are refused under it).
    """

    dataset: str
    dataset_name: str = ""
    fp16: bool = False


def dataset_key(name: str) -> str:
    """The canonical dataset name the per-dataset tables use (``ImageNet-A`` → ``imagenet_a``)."""
    # one alias table for the whole package (protext.datasets); a name it does not know (a plain
    # folder, a user's own dataset) keeps its normalised spelling and so gets no published default
    from ..datasets.catalog import DatasetError, canonical_name

    try:
        return canonical_name(name)
    except DatasetError:
        return name.strip().lower().replace("-", "_").replace(" ", "_")


def context(dataset_name: str, fp16: bool = False) -> Context:
    """The :class:`Context` of a run on ``dataset_name``."""
    return Context(dataset_key(dataset_name), dataset_name, fp16)


@dataclass(frozen=True)
class Option:
    """One setting of one method, as the command line and the results see it.

    Attributes:
        flag: the command-line flag (``--dmn-beta``); its dest (:func:`dest`) is the name the
            evaluation config keeps the value under.
        help: one sentence for ``--help``.
        type: ``int``, ``float``, ``str`` or ``bool`` (a ``--flag/--no-flag`` pair).
        default: the value when the flag is not given: a constant, or a function of the
            :class:`Context` (:func:`per_dataset` builds one from a published table).
        shown: how ``--help`` describes the default (``"published per dataset"``).
        low, high: the allowed range (``None``: unbounded); ``low_open``: ``low`` itself excluded.
        choices: the allowed values of a ``str`` option.
        aliases: older spellings of the flag, still accepted.
        metavar: the placeholder in ``--help``.
    """

    flag: str
    help: str
    type: type = float
    default: Any = None
    shown: str = ""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    metavar: Optional[str] = None

    def check(self, value: Any) -> None:
        """Refuse a value of the wrong type or out of range, naming the flag."""
        if self.type is bool:
            if not isinstance(value, bool):
                raise TTAConfigError(f"{self.flag} is on or off, got {value!r}.")
            return
        if self.choices:
            if value not in self.choices:
                raise TTAConfigError(f"{self.flag} must be one of {', '.join(self.choices)}, got '{value}'.")
            return
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise TTAConfigError(f"{self.flag} must be a whole number, got {value!r}.")
        if self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TTAConfigError(f"{self.flag} must be a number, got {value!r}.")
            if not math.isfinite(value):  # NaN would pass every comparison below as False
                raise TTAConfigError(f"{self.flag} must be {self.range_text()}, got {value}.")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise TTAConfigError(f"{self.flag} must be {self.range_text()}, got {value}.")

    def range_text(self) -> str:
        """``between 1 and 1024``, ``in (0, 1]``, ``a finite number >= 0``: the range in words."""
        low, high = self.low, self.high
        number = "a whole number" if self.type is int else "a finite number"
        if low is not None and high is not None:
            if self.type is int:
                return f"between {low} and {high}"
            return f"in {'(' if self.low_open else '['}{_num(low)}, {_num(high)}]"
        if low is not None:
            return f"{number} {'>' if self.low_open else '>='} {_num(low)}"
        if high is not None:
            return f"{number} <= {_num(high)}"
        return number

    def resolve(self, context: Context) -> Any:
        """The default for ``context`` (``NO_DEFAULT`` when the method has none for it)."""
        return self.default(context) if callable(self.default) else self.default


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def option(flag: str, help: str, **kwargs: Any) -> Any:
    """A settings field declared as an :class:`Option`; the field itself defaults to ``None``
    ("not given": the option's default for the dataset is filled in by :func:`resolve`)."""
    return field(default=None, metadata={"option": Option(flag, help, **kwargs)})


def per_dataset(table: Mapping[str, Any], fallback: Any = NO_DEFAULT) -> Callable[[Context], Any]:
    """A default read from a published per-dataset table, ``fallback`` for any other dataset."""

    def default(context: Context) -> Any:
        return table.get(context.dataset, fallback)

    default.table = dict(table)  # type: ignore[attr-defined]  # for --help and reproduce --plan
    return default


@dataclass(frozen=True)
class ViewRecipe:
    """How one image's views are made; methods with equal recipes can share one encoding.

    Attributes:
        views: views per image, view 0 (the image itself) included.
        augmix: AugMix on the random views.
        crop_scale: the random resized crops' area range (TPT's (0.08, 1); DMN-ZS's (0.5, 1)).
    """

    views: int
    augmix: bool
    crop_scale: tuple[float, float] = (0.08, 1.0)


@dataclass(frozen=True)
class Method:
    """One test-time adaptation method, declared once.

    Attributes:
        name: the ``--tta`` value.
        title: the method and its paper, for ``--help`` and tables.
        settings: the settings dataclass (every field an :func:`option`).
        online: whether its state carries from image to image (the stream order matters).
        tunes_prompts: whether it back-propagates through the text tower (TPT, C-TPT, O-TPT): it
            needs prompts to tune, and cannot share view features with other methods.
        views: the :class:`ViewRecipe` of resolved settings.
        build: ``(settings, model, *, text_features, encoder, fp16, image_dtype) -> Adapter``.
        check: extra checks across fields, given the values set (by field name, before defaults)
            and the :class:`Context`, or ``None`` when the dataset is not known yet (then only the
            checks that need no dataset run).
        departures: how protext's run differs from the published one (README and ``--plan``).
        oracle: results are selected on the test labels (a named variant, never a default).
    """

    name: str
    title: str
    settings: type
    online: bool
    views: Callable[[Any], ViewRecipe]
    build: Callable[..., Any]
    tunes_prompts: bool = False
    check: Optional[Callable[[Mapping[str, Any], Optional[Context]], None]] = None
    departures: tuple[str, ...] = ()
    oracle: bool = False


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (declarations call this once, at import)."""
    for name, opt in options(method):
        if opt.flag in _conflicts(name, opt):
            raise ValueError(f"{method.name}.{name}: {opt.flag} is declared with another type or range elsewhere")
    _REGISTRY[method.name] = method
    return method


def _conflicts(name: str, opt: Option) -> set[str]:
    """Flags this option shares with an earlier method under another field name, type or range:
    a shared flag must mean one thing (``--tta-views`` is views everywhere)."""
    clashes = set()
    for other in _REGISTRY.values():
        for other_name, other_opt in options(other):
            if other_opt.flag == opt.flag and (other_name != name or other_opt.type is not opt.type
                                               or (other_opt.low, other_opt.high, other_opt.choices) != (opt.low, opt.high, opt.choices)):
                clashes.add(opt.flag)
    return clashes


def options(method: Method) -> Iterator[tuple[str, Option]]:
    """``(field name, Option)`` of every setting of ``method``, in declaration order."""
    for f in dataclasses.fields(method.settings):
        yield f.name, f.metadata["option"]
