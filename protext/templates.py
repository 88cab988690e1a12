"""Which sentence a class name goes into: the three template rules behind the published numbers.

The papers this toolkit reproduces use three different rules, and all three are legitimate; a
result must say which one it used (``../shared/design/PUBLISHED.md``):

- ``protext``: ProText's templates (PRESETS.md, "Cross-dataset templates"). Learned prompts put
  their context in place of the leading "a photo of a" (:data:`CONTEXT_PHRASE`).
- ``coop``: CoOp's one template per dataset, used by the CLIP rows of the ProText tables. They
  differ from ProText's on DTD, EuroSAT, Food101 and UCF101.
- ``tpt``: ``a photo of a {}.`` on every dataset: TPT's protocol and its CLIP baseline.

Dataset keys are the canonical names of :mod:`protext.datasets` (``oxford_pets``, ``imagenet_a``, ...).
"""

from __future__ import annotations

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
