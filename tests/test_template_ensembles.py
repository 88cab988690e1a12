"""Template-ensemble class features: CLIP's 80 ImageNet templates (TDA on ImageNet-R and -Sketch) and
ZERO's seven, checked against template texts written here by hand from CLIP's notebook / TDA's
``imagenet_templates`` and against features computed one sentence at a time on tiny-clip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protext.templates import (
    TEMPLATE_ENSEMBLES,
    ensemble_templates,
    openai_imagenet_templates,
    templates_from_open_clip,
)
from protext.zeroshot import ZeroShotError, cupl_text_features, ensemble_text_features, template_ensemble_features

# CLIP's ImageNet prompt-engineering list as TDA's code copies it: 80 entries, these at its two ends
CLIP80_HEAD = ("a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.")
CLIP80_TAIL = ("a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.")
# Tip-Adapter's seven (ZERO+Ensemble, TDA on ImageNet/A/V2/Caltech/Cars/SUN): all seven are among CLIP's 80
TIP_SEVEN = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)
NAMES = ["golden_retriever", "ox", "Great Dane"]


def test_clip_80_templates_from_open_clip():
    templates = openai_imagenet_templates()
    assert len(templates) == 80 and len(set(templates)) == 80
    assert templates[:4] == CLIP80_HEAD and templates[-5:] == CLIP80_TAIL
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    assert all(t.count("{}") == 1 for t in templates)
    assert set(TIP_SEVEN) <= set(templates)


def test_named_ensembles():
    assert TEMPLATE_ENSEMBLES == ("ensemble", "ensemble80")
    assert ensemble_templates("ensemble") == TIP_SEVEN
    assert ensemble_templates("ensemble80") == openai_imagenet_templates()
    with pytest.raises(ValueError, match="ensemble80"):
        ensemble_templates("ensemble81")


def test_open_clip_entries_become_brace_strings():
    entries = (lambda c: f"a photo of a {c}.", "itap of a {}.", lambda c: f"{c} art.")
    assert templates_from_open_clip(entries) == ("a photo of a {}.", "itap of a {}.", "{} art.")
    with pytest.raises(ValueError, match="one '\\{\\}'"):
        templates_from_open_clip((lambda c: "no class name here.",))
    with pytest.raises(ValueError, match="one '\\{\\}'"):
        templates_from_open_clip((lambda c: f"{c} and {c}.",))


def _by_hand(model, tok, names, templates) -> torch.Tensor:
    """Per class: encode each sentence alone, normalise, average, normalise (TDA's clip_classifier)."""
    rows = []
    with torch.no_grad():
        for name in names:
            per_template = []
            for template in templates:
                sentence = template.replace("{}", name.replace("_", " "))
                feature = model.encode_text(tok([sentence]))[0]
                per_template.append(feature / feature.norm())
            mean = torch.stack(per_template).mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def test_clip_80_ensemble_features_equal_hand_computation(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    want = _by_hand(model, tok, NAMES, openai_imagenet_templates())
    got = template_ensemble_features(model, tok, NAMES, "ensemble80", token_budget=200)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # not the seven-template ensemble, nor one template: the 80 make a different feature
    seven = _by_hand(model, tok, NAMES, TIP_SEVEN)
    assert (got - seven).abs().max() > 1e-3


def test_seven_template_ensemble_equals_hand_and_the_description_path(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    got = template_ensemble_features(model, tok, NAMES, "ensemble")
    torch.testing.assert_close(got, _by_hand(model, tok, NAMES, TIP_SEVEN), atol=1e-5, rtol=0)
    # the evaluation's --method ensemble builds it as a CuPL-style description average: same feature
    texts = {n: [t.format(n.replace("_", " ")) for t in TIP_SEVEN] for n in NAMES}
    torch.testing.assert_close(got, cupl_text_features(model, tok, NAMES, texts), atol=1e-5, rtol=0)


def test_ensemble_of_one_template_is_the_template(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    got = ensemble_text_features(model, tok, NAMES, ["a photo of a {}."])
    with torch.no_grad():
        want = F.normalize(model.encode_text(tok([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_bad_ensembles_refused(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    with pytest.raises(ZeroShotError, match="at least one template"):
        ensemble_text_features(model, tok, NAMES, [])
    with pytest.raises(ZeroShotError, match="no '\\{\\}'"):
        ensemble_text_features(model, tok, NAMES, ["a photo of a {}.", "a photo."])


def test_eval_method_ensemble80_uses_clips_80_templates(tmp_path, tiny_clip):
    """``eval --method ensemble80``: class features are the normalised mean of the 80 normalised sentence
    features (computed here one sentence at a time), and the result records the 80 templates."""
    from PIL import Image

    from protext.evaluation import EvalConfig, evaluate
    from protext.evaluation.config import METHODS
    from protext.evaluation.features import class_features

    assert METHODS[:5] == ("clip", "cupl", "prompts", *TEMPLATE_ENSEMBLES)
    assert all(m.endswith(("+cupl", "+descriptors")) for m in METHODS[5:])  # the template + description mixes
    names = ["golden_retriever", "tabby_cat"]
    for name, colour in zip(names, ((200, 30, 30), (30, 30, 200))):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), colour).save(tmp_path / "imgs" / name / "a.png")
    config = EvalConfig(dataset="folder", root=str(tmp_path / "imgs"), model="tiny-clip", pretrained="random",
                        device="cpu", precision="fp32", method="ensemble80", workers=0, progress=False,
                        out=str(tmp_path / "r.json"))
    payload = evaluate(config, clip=tiny_clip, progress=False)
    assert payload["template"]["templates"][:4] == list(CLIP80_HEAD) and len(payload["template"]["templates"]) == 80
    assert payload["template"]["source"] == "--method ensemble80"

    model, tok = tiny_clip.model, tiny_clip.tokenizer
    with torch.no_grad():
        want = []
        for name in names:
            spoken = name.replace("_", " ")
            sentences = [t.format(spoken) for t in (*CLIP80_HEAD, *openai_imagenet_templates()[4:])]
            per = torch.stack([F.normalize(model.encode_text(tok([s])).float(), dim=-1)[0] for s in sentences])
            want.append(F.normalize(per.mean(0), dim=0))
        got = class_features(config, tiny_clip, names, "unused {}", None)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)
    seven = class_features(EvalConfig(dataset="folder", root=".", method="ensemble"), tiny_clip, names, "unused {}", None)
    assert not torch.allclose(got, seven, atol=1e-4)  # the 80 are not the seven
