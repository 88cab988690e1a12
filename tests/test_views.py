"""protext.tta.views: TPT views and the paper-magnitude AugMix (ALGORITHMS.md §5 step 1)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from protext.tta.views import (
    AUGMIX_OPS,
    CLIP_MEAN,
    CLIP_STD,
    AugMix,
    AugOp,
    TPTViews,
    _random_resized_crop_params,
    _sample_beta,
    _sample_dirichlet,
    _sample_gamma,
    view_transform_for,
)

BILINEAR = TF.InterpolationMode.BILINEAR
SIDE = 224
# §5: |magnitude| at severity 1 lies in [0.1/10, 1/10] x the op's maximum.
RANGES = {
    "rotate": (0.3, 3.0),
    "shear_x": (0.003, 0.03),
    "shear_y": (0.003, 0.03),
    "translate_x": (SIDE / 3 * 0.01, SIDE / 3 * 0.1),
    "translate_y": (SIDE / 3 * 0.01, SIDE / 3 * 0.1),
    "posterize": (0.04, 0.4),
    "solarize": (2.56, 25.6),
    "autocontrast": (0.0, 0.0),
    "equalize": (0.0, 0.0),
}


def _textured(h: int = SIDE, w: int = SIDE, seed: int = 0) -> np.ndarray:
    """uint8 RGB texture: edges, gradients, noise; R reaches 255 (solarize has something to
    invert) but starts at 51, G stays in 25..178 (autocontrast has something to stretch)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 0.6 + 0.4 * np.sin(xx / 6.0) * np.cos(yy / 9.0)
    r[(xx // 16 + yy // 16) % 2 == 0] = 1.0
    g = 0.4 + 0.2 * np.sin((xx + yy) / 11.0) + 0.05 * rng.standard_normal((h, w))
    b = rng.random((h, w)) * (yy / h)
    arr = np.stack([np.clip(r, 0.2, 1.0), np.clip(g, 0.1, 0.7), b], -1)
    return np.round(arr * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def texture() -> torch.Tensor:
    return torch.from_numpy(_textured()).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(_textured(300, 400, seed=1))


def _denorm(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(-1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(-1, 3, 1, 1)
    return x * std + mean


# --------------------------------------------------------------------------------------------
# TPTViews
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("augmix", [True, False])
def test_views_shape_and_view0_reference(photo, augmix):
    views = TPTViews(n_views=16, augmix=augmix)(photo, torch.Generator().manual_seed(0))
    assert views.shape == (16, 3, SIDE, SIDE) and views.dtype == torch.float32
    reference = T.Compose(
        [
            T.Resize(SIDE, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(SIDE),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )(photo)
    torch.testing.assert_close(views[0], reference, atol=1e-6, rtol=0)
    pixels = _denorm(views)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # normalised with CLIP's statistics: channel means shift by -mean/std
    assert not torch.allclose(views[1], views[2])


def test_view0_of_grayscale_and_small_resolution():
    gray = Image.fromarray(_textured(90, 60)[..., 0], mode="L")
    views = TPTViews(n_views=3, resolution=32)(gray, torch.Generator().manual_seed(0))
    assert views.shape == (3, 3, 32, 32)
    ref = TF.to_tensor(TF.center_crop(TF.resize(gray.convert("RGB"), 32, T.InterpolationMode.BICUBIC), 32))
    torch.testing.assert_close(_denorm(views[:1])[0], ref, atol=1e-5, rtol=0)


def test_tensor_input_matches_pil_input(photo):
    u8 = TF.pil_to_tensor(photo)
    g = torch.Generator().manual_seed(3)
    from_tensor = TPTViews(n_views=4)(u8, g)
    from_pil = TPTViews(n_views=4)(photo, torch.Generator().manual_seed(3))
    assert from_tensor.shape == from_pil.shape
    # tensor and PIL resampling differ slightly; same crops, flips and AugMix draws otherwise
    diff = (_denorm(from_tensor) - _denorm(from_pil)).abs().mean(dim=(1, 2, 3))
    assert diff.max() < 0.02, diff
    float_input = TPTViews(n_views=4)(u8.float() / 255, torch.Generator().manual_seed(3))
    torch.testing.assert_close(float_input, from_tensor, atol=1e-5, rtol=0)


def test_views_reproducible_from_generator_only(photo):
    views = TPTViews(n_views=8)
    state = torch.get_rng_state()
    random.seed(1)
    np.random.seed(1)
    a = views(photo, torch.Generator().manual_seed(42))
    assert torch.equal(torch.get_rng_state(), state), "the global torch RNG was used"
    torch.manual_seed(999)
    random.seed(2)
    np.random.seed(2)
    b = views(photo, torch.Generator().manual_seed(42))
    c = views(photo, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert torch.equal(a[0], c[0])  # view 0 is deterministic
    assert (a[1:] - c[1:]).abs().amax(dim=(1, 2, 3)).min() > 0.05


def test_crops_follow_random_resized_crop_and_flip(photo):
    views = TPTViews(n_views=12, augmix=False)
    crops = views.crops(photo, 11, torch.Generator().manual_seed(7))
    # replay the generator: params, then the flip coin, per crop
    g = torch.Generator().manual_seed(7)
    flips = 0
    for k in range(11):
        top, left, h, w = _random_resized_crop_params(photo.height, photo.width, g)
        ref = TF.to_tensor(TF.resized_crop(photo, top, left, h, w, [SIDE, SIDE], BILINEAR, antialias=True))
        if float(torch.rand(1, generator=g, dtype=torch.float64)) < 0.5:
            ref = ref.flip(-1)
            flips += 1
        torch.testing.assert_close(crops[k], ref, atol=1e-6, rtol=0)
    assert 0 < flips < 11


def test_random_resized_crop_params_ranges():
    g = torch.Generator().manual_seed(0)
    fractions, ratios = [], []
    for _ in range(2000):
        top, left, h, w = _random_resized_crop_params(300, 400, g)
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w and h > 0 and w > 0
        fractions.append(h * w / (300 * 400))
        ratios.append(w / h)
    assert min(fractions) > 0.07 and max(fractions) <= 1.0
    assert 0.25 < np.mean(fractions) < 0.7  # area fraction ~ U[0.08, 1], minus rejected draws
    assert min(ratios) > 0.7 and max(ratios) < 1.4
    # no crop of a 10 x 1000 strip fits the ratio bounds: centred crop of ratio 4/3
    assert _random_resized_crop_params(10, 1000, g) == (0, 493, 10, 13)


def test_view_transform_for():
    assert view_transform_for("dtd").augmix is not None
    assert view_transform_for("oxford_pets", n_views=8, resolution=112).n_views == 8
    for name in ("imagenet", "imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch"):
        assert view_transform_for(name).augmix is None
    assert view_transform_for("folder").augmix is not None


# --------------------------------------------------------------------------------------------
# AugMix ops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", AUGMIX_OPS)
def test_op_magnitudes_in_range(name):
    aug = AugMix(severity=1)
    assert aug.magnitude_range(name, SIDE) == pytest.approx(RANGES[name])
    g = torch.Generator().manual_seed(1)
    ops = [aug.sample_op(name, SIDE, g) for _ in range(400)]
    levels = np.array([op.level for op in ops])
    mags = np.array([op.magnitude for op in ops])
    assert levels.min() >= 0.1 and levels.max() <= 1.0 and levels.std() > 0.2
    lo, hi = RANGES[name]
    assert np.all(np.abs(mags) >= lo - 1e-9) and np.all(np.abs(mags) <= hi + 1e-9)
    if name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        assert 0.3 < np.mean(mags > 0) < 0.7  # random sign
        assert np.abs(mags).max() > 0.8 * hi and np.abs(mags).min() < 0.2 * hi
    else:
        assert np.all(mags >= 0)
    # a larger severity reaches further
    assert AugMix(severity=3).magnitude_range(name, SIDE)[1] == pytest.approx(3 * hi)


@pytest.mark.parametrize("name", AUGMIX_OPS)
def test_every_op_changes_the_image_at_severity_1(texture, name):
    aug = AugMix(severity=1)
    lo, hi = RANGES[name]
    signed = name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
    for magnitude in (lo, -lo, hi, -hi) if signed else (lo, hi):
        out = aug.apply_op(texture, AugOp(name, 0.1, magnitude))
        assert out.shape == texture.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
        changed = (out - texture).abs()
        assert changed.max() > 0.02, (name, magnitude)
        assert changed.mean() > 1e-3, (name, magnitude, changed.mean())


def test_torchvision_augmix_severity1_never_rotates():
    """The contrast that motivates our own AugMix: torchvision's bin 0 at severity 1 is a no-op."""
    tv = T.AugMix(severity=1)
    if not hasattr(tv, "_augmentation_space"):
        pytest.skip("torchvision internals changed")
    space = tv._augmentation_space(tv._PARAMETER_MAX, (SIDE, SIDE))
    for op in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
        assert float(space[op][0][0]) == 0.0  # the only bin randint(severity=1) can pick
    # ours draws a continuous level: a thousand severity-1 rotations, none of them a no-op
    ours = AugMix(severity=1)
    lo, hi = ours.magnitude_range("rotate", SIDE)
    assert lo == pytest.approx(0.3)  # never below 0.3 degrees
    g = torch.Generator().manual_seed(0)
    angles = [ours.sample_op("rotate", SIDE, generator=g).magnitude for _ in range(1000)]
    assert all(lo - 1e-9 <= abs(a) <= hi + 1e-9 for a in angles) and len(set(angles)) == 1000
    assert any(a < 0 for a in angles) and any(a > 0 for a in angles)  # both directions


def _tf_reference(x: torch.Tensor, op: AugOp) -> torch.Tensor:
    """The op written directly with torchvision's functional primitives."""
    m = op.magnitude
    q = (x * 255).round().to(torch.uint8)
    if op.name == "rotate":
        return TF.rotate(x, m, interpolation=BILINEAR)
    if op.name == "shear_x":  # shear factor m about the top-left corner, as the paper's PIL code
        return TF.affine(x, 0.0, [0, 0], 1.0, [math.degrees(math.atan(m)), 0.0], BILINEAR, center=[0, 0])
    if op.name == "shear_y":
        return TF.affine(x, 0.0, [0, 0], 1.0, [0.0, math.degrees(math.atan(m))], BILINEAR, center=[0, 0])
    if op.name == "translate_x":  # PIL's data (1, 0, m, ...) samples x + m: content moves by -m
        return TF.affine(x, 0.0, [-m, 0.0], 1.0, [0.0, 0.0], BILINEAR)
    if op.name == "translate_y":
        return TF.affine(x, 0.0, [0.0, -m], 1.0, [0.0, 0.0], BILINEAR)
    if op.name == "autocontrast":
        return TF.autocontrast(x)
    if op.name == "equalize":
        return TF.equalize(q).float() / 255
    if op.name == "posterize":
        return TF.posterize(q, 4 - int(m)).float() / 255
    if op.name == "solarize":
        return TF.solarize(x, (256 - m) / 255)
    raise AssertionError(op.name)


@pytest.mark.parametrize("name", AUGMIX_OPS)
def test_ops_equal_torchvision_functional(texture, name):
    aug = AugMix(severity=1)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        op = aug.sample_op(name, SIDE, g)
        # equal up to float32 rounding of the sampling grid
        torch.testing.assert_close(aug.apply_op(texture, op), _tf_reference(texture, op), atol=1e-4, rtol=0)
    # batched application: one magnitude for every image of the batch
    batch = torch.stack([texture, texture.flip(-1)])
    out = aug.apply_op(batch, op)
    torch.testing.assert_close(out[1], _tf_reference(texture.flip(-1), op), atol=1e-4, rtol=0)


def _pil_paper_op(img: Image.Image, op: AugOp) -> Image.Image:
    """The AugMix paper's op for a given magnitude (its PIL calls, without the int truncation)."""
    m, size = op.magnitude, img.size
    if op.name == "rotate":
        return img.rotate(m, resample=Image.BILINEAR)
    data = {
        "shear_x": (1, m, 0, 0, 1, 0),
        "shear_y": (1, 0, 0, m, 1, 0),
        "translate_x": (1, 0, m, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, m),
    }.get(op.name)
    if data is not None:
        return img.transform(size, Image.AFFINE, data, resample=Image.BILINEAR)
    if op.name == "autocontrast":
        return ImageOps.autocontrast(img)
    if op.name == "equalize":
        return ImageOps.equalize(img)
    if op.name == "posterize":
        return ImageOps.posterize(img, 4 - int(m))
    if op.name == "solarize":
        return ImageOps.solarize(img, 256 - int(m))
    raise AssertionError(op.name)


@pytest.mark.parametrize("name", AUGMIX_OPS)
def test_ops_match_the_paper_pil_ops(name):
    arr = _textured(96, 128, seed=2)
    pil = Image.fromarray(arr)
    x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    aug = AugMix(severity=1)
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        op = aug.sample_op(name, (96, 128), g)
        ours = aug.apply_op(x, op)
        ref = torch.from_numpy(np.array(_pil_paper_op(pil, op))).permute(2, 0, 1).float() / 255
        diff = (ours - ref).abs()
        if name in ("equalize", "posterize", "solarize"):
            assert diff.max() < 1e-6, (name, op)
        elif name == "autocontrast":
            assert diff.max() <= 1.01 / 255, (name, op)  # PIL rounds its lookup table
        else:
            # same geometry (PIL quantises and treats the outermost pixels differently)
            assert diff.median() < 1.5 / 255 and torch.quantile(diff.flatten(), 0.95) < 6 / 255, (name, op)


# --------------------------------------------------------------------------------------------
# AugMix sampling and mixing
# --------------------------------------------------------------------------------------------


def test_samplers_match_their_distributions():
    g = torch.Generator().manual_seed(0)
    for alpha in (0.5, 1.0, 2.5):
        x = _sample_gamma(alpha, (20000,), g)
        assert x.min() >= 0 and abs(x.mean().item() - alpha) < 0.05 * alpha + 0.02
        assert abs(x.var().item() - alpha) < 0.1 * alpha + 0.03
    w = _sample_dirichlet(1.0, (20000, 3), g)
    torch.testing.assert_close(w.sum(-1), torch.ones(20000, dtype=torch.float64))
    assert torch.allclose(w.mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01)
    b = _sample_beta(1.0, 1.0, (20000,), g)
    assert abs(b.mean().item() - 0.5) < 0.01 and abs(b.var().item() - 1 / 12) < 0.005  # uniform


def test_plan_matches_the_augmix_recipe():
    aug = AugMix()
    plan = aug.sample_plan(500, SIDE, torch.Generator().manual_seed(0))
    assert plan.weights.shape == (500, 3) and plan.ops.shape == (500, 3, 3)
    torch.testing.assert_close(plan.weights.sum(1), torch.ones(500, dtype=torch.float64))
    assert plan.weights.min() >= 0 and 0 <= plan.mix.min() and plan.mix.max() <= 1
    assert set(plan.depths.flatten().tolist()) == {1, 2, 3}
    assert set(plan.ops.flatten().tolist()) == set(range(len(AUGMIX_OPS)))
    for n in range(0, 500, 37):
        for c in range(3):
            for s in range(3):
                op = plan.op(n, c, s)
                lo, hi = RANGES[op.name]
                assert lo - 1e-9 <= abs(op.magnitude) <= hi + 1e-9
                assert op.magnitude == pytest.approx(
                    math.copysign(op.level / 10 * aug._max_magnitude(op.name, SIDE), op.magnitude)
                )
    fixed = AugMix(depth=2).sample_plan(10, SIDE, torch.Generator().manual_seed(0))
    assert set(fixed.depths.flatten().tolist()) == {2}


def test_batched_augmix_equals_op_by_op_reference(texture):
    aug = AugMix()
    crops = torch.stack([texture, texture.flip(-1), texture.flip(-2), TF.rotate(texture, 90.0)])
    plan = aug.sample_plan(4, SIDE, torch.Generator().manual_seed(3))
    out = aug.apply_plan(crops, plan)
    for n in range(4):
        mixed_ours = torch.zeros_like(texture)
        mixed_tf = torch.zeros_like(texture)
        for c in range(3):
            x_ours = x_tf = crops[n]
            for s in range(int(plan.depths[n, c])):
                x_ours = aug.apply_op(x_ours, plan.op(n, c, s))
                x_tf = _tf_reference(x_tf, plan.op(n, c, s))
            mixed_ours += float(plan.weights[n, c]) * x_ours
            mixed_tf += float(plan.weights[n, c]) * x_tf
        m = float(plan.mix[n])
        # the batched bookkeeping (grouping by op, in-place chains, mixing) is exact
        torch.testing.assert_close(out[n], m * crops[n] + (1 - m) * mixed_ours, atol=1e-6, rtol=0)
        # against chains of plain torchvision calls: float32 grid rounding (~1e-5) can flip the
        # 8-bit rounding inside equalize/posterize on a rare pixel, nothing more
        diff = (out[n] - (m * crops[n] + (1 - m) * mixed_tf)).abs()
        assert diff.mean() < 1e-5 and (diff > 1e-4).float().mean() < 2e-3, (diff.mean(), diff.max())


def test_augmix_output_is_float_mix_not_requantised(texture):
    aug = AugMix()
    out = aug(texture, torch.Generator().manual_seed(0))
    assert out.shape == texture.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert (out - texture).abs().mean() > 1e-3
    on_grid = torch.isclose(out * 255, (out * 255).round(), atol=1e-3)
    assert on_grid.float().mean() < 0.5  # a Beta/Dirichlet mix lands between 8-bit levels
    again = aug(texture, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(TypeError):
        aug((texture * 255).to(torch.uint8))
    with pytest.raises(ValueError):
        AugMix(depth=0)
