"""Views use the model's own preprocessing (issue 11 item 3); per-method view settings (TTA.md)."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from protext.models import register_model_configs
from protext.tta import TTAConfig, model_preprocess_cfg, view_maker
from protext.tta.views import TPTViews


def _photo(w: int = 301, h: int = 217, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
    return Image.fromarray(arr)


def _model(**overrides):
    """tiny-clip with a preprocessing config of its own (open_clip records it on model.visual)."""
    register_model_configs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=None, **overrides)
    return model, preprocess


MODELS = {
    "openai-stats": {},
    "other-stats": {"image_mean": (0.5, 0.4, 0.3), "image_std": (0.2, 0.25, 0.3), "image_interpolation": "bilinear"},
    "squash-96": {"force_image_size": 96, "image_mean": (0.1, 0.2, 0.3), "image_std": (0.5, 0.5, 0.5), "image_resize_mode": "squash"},
    "longest": {"image_mean": (0.45, 0.45, 0.45), "image_std": (0.3, 0.3, 0.3), "image_resize_mode": "longest"},
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method", ["tpt", "tda"])
def test_view0_is_the_models_preprocess(name, method):
    model, preprocess = _model(**MODELS[name])
    image = _photo()
    views = view_maker(TTAConfig(method=method), "imagenet", model_preprocess_cfg(model))
    out = views(image, torch.Generator().manual_seed(0))
    want = preprocess(image)
    assert out.shape[1:] == want.shape
    assert torch.equal(out[0], want)
    assert out.shape[0] == (64 if method == "tpt" else 1)  # TDA on ImageNet: the image alone


def test_statistics_change_the_views():
    cfg_a = model_preprocess_cfg(_model()[0])
    cfg_b = model_preprocess_cfg(_model(**MODELS["other-stats"])[0])
    a = view_maker(TTAConfig(method="zero"), "dtd", cfg_a)(_photo(), torch.Generator().manual_seed(1))
    b = view_maker(TTAConfig(method="zero"), "dtd", cfg_b)(_photo(), torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)


def test_random_views_are_normalised_with_the_models_stats():
    """Crops (no AugMix) normalised with the model's mean/std: undoing them gives [0, 1] pixels equal
    to the crops of a view maker with identity statistics."""
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    maker = TPTViews(n_views=8, resolution=64, augmix=False, mean=mean, std=std)
    plain = TPTViews(n_views=8, resolution=64, augmix=False, mean=(0, 0, 0), std=(1, 1, 1))
    got = maker(_photo(), torch.Generator().manual_seed(3))
    raw = plain(_photo(), torch.Generator().manual_seed(3))
    want = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "method,dataset,views,augmix",
    [
        ("tpt", "dtd", 64, True),
        ("tpt", "imagenet_a", 64, False),
        ("ctpt", "oxford_pets", 64, True),
        ("zero", "dtd", 64, False),  # ZERO: no AugMix anywhere
        ("mta", "food101", 64, False),
        ("tda", "imagenet_r", 64, True),  # TDA: 64 AugMix views on the natural shifts
        ("tda", "caltech101", 1, False),
    ],
)
def test_view_maker_per_method(method, dataset, views, augmix):
    maker = view_maker(TTAConfig(method=method), dataset, None)
    assert maker.n_views == views and (maker.augmix is not None) == augmix
    assert maker.mean == (0.48145466, 0.4578275, 0.40821073)  # None: OpenAI CLIP's preprocessing
    again = pickle.loads(pickle.dumps(maker))  # DataLoader workers receive it pickled
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(again(_photo(), gen()), maker(_photo(), gen()))


def test_zero_views_are_plain_crops():
    """ZERO's random views are the crops and flips of TPT's pipeline with AugMix left out."""
    zero = view_maker(TTAConfig(method="zero"), "dtd", None)
    crops = TPTViews(n_views=64, augmix=False)
    assert torch.equal(zero(_photo(), torch.Generator().manual_seed(2)), crops(_photo(), torch.Generator().manual_seed(2)))
