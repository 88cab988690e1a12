"""Class features for the loop: which template, which checkpoint, and the features themselves.

``--method clip`` (one template), ``cupl`` (mean of description features), ``prompts`` (a learned
checkpoint through :func:`protext.checkpoint.class_encoder`, the one checkpoint→encoder path) and
``ensemble`` (ZERO+Ensemble's seven templates, TTA.md §1.6, averaged like CuPL's descriptions),
``ensemble80`` (CLIP's 80), and the mixes of templates and descriptions in one mean
(``template+cupl``, ``ensemble+cupl``, ``ensemble80+cupl``: DMN-ZS's and DPE's ``tip_cupl``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..checkpoint import PromptCheckpoint, check_weights, class_encoder, load_coop, load_prompts
from ..digests import file_sha256
from ..templates import FROM_TRAINING, TEMPLATE_ENSEMBLES, choose_template
from .config import COOP_SUFFIXES, MIXED_FEATURES, TPS_FEATURES, EvalConfig


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file: the identity of a checkpoint or description file in the results."""
    return file_sha256(path)

def input_digests(config: EvalConfig) -> dict[str, str]:
    """sha256 of every input file that exists (for the resume fingerprint and the results)."""
    return {flag: file_digest(path) for flag, path in config.input_paths().items() if Path(path).is_file()}


def load_checkpoint(config: EvalConfig) -> Optional[PromptCheckpoint]:
    """The checkpoint ``--prompts`` names, read in the format the TTA init or the suffix asks for."""
    if not config.prompts:
        return None
    coop = (config.tunes_prompts and config.resolved_tta_init() == "coop") or Path(config.prompts).suffix in COOP_SUFFIXES
    return load_coop(config.prompts) if coop else load_prompts(config.prompts)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def checkpoint_identity(path: str, checkpoint: PromptCheckpoint, weights) -> dict[str, Any]:
    """What the results record of a checkpoint: file hash, shape, metadata, both fingerprints."""
    # class lists can hold a thousand names: count them instead of copying them into every result
    meta = {k: v for k, v in checkpoint.meta.items() if k not in ("classnames", "classes") and _jsonable(v)}
    if isinstance(checkpoint.meta.get("classes"), list):
        meta["n_classes"] = len(checkpoint.meta["classes"])
    return {
        "path": str(path),
        "sha256": file_digest(path),
        "n_ctx": checkpoint.n_ctx,
        "depth": checkpoint.depth,
        "width": checkpoint.width,
        "context_replaces": checkpoint.context_replaces,
        "text_tower_fingerprint": {"checkpoint": weights.checkpoint, "model": weights.model, "matches": weights.matches},
        "meta": meta,
    }


def training_dataset(meta: dict[str, Any]) -> Optional[str]:
    """The dataset a checkpoint's prompts were learned for, from its metadata (None if unknown).

    protext training records its preset (``text_only/dtd``, ``base2novel/dtd``, ``cross_dataset``)
    and the preset's values, which name the dataset.
    """
    if meta.get("dataset"):
        return str(meta["dataset"])
    values = meta.get("preset_values")
    if isinstance(values, dict) and values.get("dataset"):
        return str(values["dataset"])
    preset = meta.get("preset")
    if isinstance(preset, str) and "/" in preset:
        return preset.rsplit("/", 1)[1]
    return None


@dataclass
class TemplateChoice:
    """The template a run used and why (recorded in every result)."""

    template: str
    source: str
    rule: str

    def record(self) -> dict[str, str]:
        return {"template": self.template, "source": self.source, "rule": self.rule}


def resolve_template(config: EvalConfig, dataset_name: str, checkpoint: Optional[PromptCheckpoint]) -> TemplateChoice:
    """``--template`` wins; prompts evaluated on the dataset they were trained on keep their training
    template (ProText's in-domain protocol); everything else takes ``--templates RULE``'s template."""
    rule = config.templates
    if config.template:
        return TemplateChoice(config.template, "--template", rule)
    prompts = checkpoint if config.uses_checkpoint() else None
    # the policy itself is protext.templates.choose_template's, shared with the table planner
    decision = choose_template(
        dataset_name, rule, aliases=(config.dataset,),
        trained_on=training_dataset(prompts.meta) if prompts is not None else None,
        training_template=prompts.meta.get("template") if prompts is not None else None,
    )
    source = "checkpoint (same dataset)" if decision.source == FROM_TRAINING else f"--templates {rule}"
    return TemplateChoice(decision.template, source, rule)


def ensemble_templates(method: str = "ensemble") -> tuple[str, ...]:
    """The templates a ``--method`` ensemble averages: ``ensemble`` ZERO+Ensemble's seven, ``ensemble80``
    CLIP's 80 ImageNet templates (:func:`protext.templates.ensemble_templates` owns both lists)."""
    from ..templates import ensemble_templates as named

    return named(method)


def prompt_encoder(config: EvalConfig, clip, classnames: Sequence[str], template: str, checkpoint: Optional[PromptCheckpoint]):
    """The prompted encoder TPT/C-TPT tune, or ``--method prompts`` reads: the checkpoint's prompts,
    or TPT's hand-crafted ``a photo of a`` when nothing is loaded from ``--prompts``."""
    if config.tunes_prompts:  # TPT/C-TPT start from what --tta-init names, whatever --method says
        use = checkpoint if config.resolved_tta_init() in ("prompts", "coop") else None
    else:
        use = checkpoint if config.method == "prompts" else None
    return class_encoder(clip.model, clip.tokenizer, classnames, template, use)


@torch.no_grad()
def class_features(config: EvalConfig, clip, classnames: Sequence[str], template: str, checkpoint, descriptions=None) -> torch.Tensor:
    """Normalised fp32 class features ``(n_classes, dim)`` for ``config.method``."""
    from ..zeroshot import clip_text_features, cupl_text_features, prompt_text_features

    model, tokenizer = clip.model, clip.tokenizer
    if config.method == "clip":
        return clip_text_features(model, tokenizer, classnames, template)
    if config.method == "cupl":
        return cupl_text_features(model, tokenizer, classnames, descriptions, source=config.descriptions)
    if config.method == TPS_FEATURES:
        return template_descriptor_prototypes(model, tokenizer, classnames, descriptions, config.descriptions)
    if config.method in TEMPLATE_ENSEMBLES or config.method in MIXED_FEATURES:
        from ..classlists import clean_classname

        base = config.method.replace("+cupl", "")
        templates = (template,) if base == "template" else ensemble_templates(base)
        texts = {name: [t.format(clean_classname(name)) for t in templates] for name in classnames}
        if config.method in MIXED_FEATURES:  # one mean over the templates and the descriptions of a class
            from ..descriptions import match_classnames

            found = match_classnames(descriptions.keys(), classnames).mapping  # unmatched: refused below
            texts = {name: texts[name] + list(descriptions[found[name]]) if name in found else [] for name in classnames}
        return cupl_text_features(model, tokenizer, classnames, texts, source=f"the {config.method} prompts")
    return prompt_text_features(prompt_encoder(config, clip, classnames, template, checkpoint))


@torch.no_grad()
def template_descriptor_prototypes(model, tokenizer, classnames: Sequence[str], descriptors, source: str) -> torch.Tensor:
    """TPS's published prototypes (TTA2.md §10): per class ``(a_c + d_c) / 2``, ``a_c`` the mean of the
    normalised features of CLIP's 80 templates, ``d_c`` that of ``"{class}, which … {descriptor}"``
    for each of its descriptors (TPS's sentence rule); returned normalised, as every method reads
    its class features (TPS normalises its prototypes before shifting them)."""
    import torch.nn.functional as F

    from ..classlists import clean_classname
    from ..descriptions import match_classnames
    from ..tta.tps import descriptor_sentence, prototypes_from_parts
    from ..zeroshot import encode_texts
    from .config import EvalError

    found = match_classnames(descriptors.keys(), classnames)
    lacking = found.missing + [name for name, key in found.mapping.items() if not descriptors[key]]
    if lacking:
        raise EvalError(f"--descriptions {source} has no descriptors for {len(lacking)} of {len(classnames)} classes "
                        f"(first: {lacking[0]!r}); every class needs at least one.")
    templates = ensemble_templates("ensemble80")

    def mean_feature(texts: list[str]) -> torch.Tensor:
        return F.normalize(encode_texts(model, tokenizer, texts).float(), dim=-1).mean(0)

    parts_a, parts_d = [], []
    for name in classnames:
        clean = clean_classname(name)
        parts_a.append(mean_feature([t.format(clean) for t in templates]))
        parts_d.append(mean_feature([descriptor_sentence(clean, d) for d in descriptors[found.mapping[name]]]))
    return F.normalize(prototypes_from_parts(torch.stack(parts_a), torch.stack(parts_d)), dim=-1)


def read_description_source(path: str) -> dict[str, list[str]]:
    """A protext description cache (.jsonl) or a CuPL JSON file, as ``{class: [descriptions]}``."""
    from .. import descriptions

    if Path(path).suffix == ".json":
        return descriptions.load_cupl_json(path)
    return descriptions.read_descriptions(path)


def check_finite(logits: torch.Tensor, config: EvalConfig) -> None:
    """Non-finite logits mean corrupted inputs: refuse, naming what the features came from."""
    if bool(torch.isfinite(logits).all()):
        return
    from .config import EvalError

    source = f"descriptions {config.descriptions}" if config.descriptions and config.method.endswith("cupl") else \
        {"prompts": f"checkpoint {config.prompts}"}.get(config.method, f"model {config.model} ({config.pretrained})")
    if config.tunes_prompts and config.prompts:
        source = f"checkpoint {config.prompts}"
    raise EvalError(f"logits are not finite (NaN or inf): {source} holds corrupted values; restore it or train again.")


__all__ = [
    "TemplateChoice",
    "check_finite",
    "check_weights",
    "checkpoint_identity",
    "class_features",
    "ensemble_templates",
    "file_digest",
    "input_digests",
    "load_checkpoint",
    "prompt_encoder",
    "read_description_source",
    "resolve_template",
    "training_dataset",
]
