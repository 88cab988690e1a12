"""The test-time adaptation registry: one declaration per method, everything else derived from it.

A method is declared once, in ``protext/tta/methods/NAME.py``: a settings dataclass whose fields are
:func:`option`\\ s (flag, type, range, help, the published value per dataset) and a :class:`Method`
(how its views are made, whether it is online, how its adapter is built). From that declaration come
the method's flags in ``eval --help`` (grouped per method), the validation (here, once: every message
names the flag), the published defaults resolved for a dataset, the settings recorded in every result
and the ``reproduce --plan`` lines. Adding an option is adding one field.

This module (the lookups; the declaration vocabulary is :mod:`protext.tta.declare`) and the
declarations import no torch: flags are parsed and refused before anything heavy
loads. The algorithm of each method lives in ``protext/tta/NAME.py``; a declaration's ``build``
imports it only when an adapter is made.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from . import methods  # noqa: F401  (each declaration registers itself on import)
from .declare import (  # noqa: F401  (the declaration vocabulary, re-exported: one import for callers)
    _REGISTRY,
    NO_DEFAULT,
    Context,
    Method,
    Option,
    TTAConfigError,
    ViewRecipe,
    context,
    dataset_key,
    option,
    options,
    per_dataset,
    register,
)

__all__ = [
    "Context",
    "Method",
    "NO_DEFAULT",
    "Option",
    "TTAConfigError",
    "ViewRecipe",
    "context",
    "dataset_key",
    "dest",
    "get",
    "names",
    "option",
    "options",
    "check_given",
    "per_dataset",
    "record",
    "register",
    "resolve",
    "shared_flags",
]


def names() -> tuple[str, ...]:
    """Every ``--tta`` value, in declaration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    """The method called ``name``; an unknown name is refused naming ``--tta``."""
    if name not in _REGISTRY:
        raise TTAConfigError(f"--tta must be one of {', '.join(_REGISTRY)}, got '{name}'.")
    return _REGISTRY[name]


def dest(flag: str) -> str:
    """The attribute a flag's value is kept under: ``--tda-alpha`` → ``tda_alpha``."""
    return flag.lstrip("-").replace("-", "_")


def shared_flags() -> dict[str, tuple[Option, tuple[str, ...]]]:
    """Every flag of every method: ``flag -> (Option, methods that take it)``, in first-use order."""
    out: dict[str, tuple[Option, tuple[str, ...]]] = {}
    for method in _REGISTRY.values():
        for _, opt in options(method):
            first, users = out.get(opt.flag, (opt, ()))
            out[opt.flag] = (first, users + (method.name,))
    return out


def resolve(name: str, given: Mapping[str, Any], context: Context) -> Any:
    """The settings of method ``name`` for ``context``: ``given`` (flag dest → value, ``None`` or
    absent: not given) checked, every other field filled with its default.

    Raises:
        TTAConfigError: an option of another method, a value out of range, a cross-field rule of
            the method, or a default the method does not publish for this dataset (one line, naming
            the flag, before any model loads).
    """
    method = get(name)
    by_field = check_given(name, given, context)
    resolved = {}
    for field_name, opt in options(method):
        value = by_field.get(field_name, None)
        if value is None:
            value = opt.resolve(context)
            if value is NO_DEFAULT:
                raise TTAConfigError(
                    f"--tta {name} has no published {opt.flag} for dataset '{context.dataset_name or context.dataset}'; "
                    f"pass {opt.flag}.")
        resolved[field_name] = value
    return method.settings(**resolved)


def check_given(name: str, given: Mapping[str, Any], context: Optional[Context] = None) -> dict[str, Any]:
    """Refuse an option ``name`` does not take, a value out of range and a bad combination; with
    ``context`` (the dataset known) also what depends on the dataset.

    Returns the values set, by settings field name.
    """
    method = get(name)
    own = {opt.flag: field_name for field_name, opt in options(method)}
    by_field: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if flag not in own:
            users = shared_flags().get(flag, (None, ()))[1]
            where = f" (it is for --tta {', '.join(users)})" if users else ""
            raise TTAConfigError(f"{flag} does not apply to --tta {name}{where}; drop it.")
        by_field[own[flag]] = value
    for field_name, opt in options(method):
        if field_name in by_field:
            opt.check(by_field[field_name])
    if method.check is not None:
        method.check(by_field, context)
    return by_field


def record(name: str, settings: Any) -> dict[str, Any]:
    """The settings as plain JSON values, with the view recipe they imply (for results and plans)."""
    method = get(name)
    recipe = method.views(settings)
    out = dataclasses.asdict(settings)
    out.update(views=recipe.views, augmix=recipe.augmix)
    if recipe.crop_scale != (0.08, 1.0):
        out["crop_scale"] = list(recipe.crop_scale)
    return out
