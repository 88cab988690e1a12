"""Test-time views for every TTA method (ALGORITHMS.md §5 step 1, TTA.md).

View 0 is the test image itself (bicubic resize of the shorter side + centre crop). Views 1.. are
random resized crops with a random horizontal flip of the *original* image; for the fine-grained
datasets each crop then goes through AugMix with the magnitudes of the AugMix paper's code.

All views of an image are produced as one batch of tensors, so the same code runs on CPU or GPU,
and every random number comes from the caller's ``torch.Generator`` so a view set is reproducible.
AugMix itself lives in :mod:`.augmix` (its names are re-exported here).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from ..datasets import is_imagenet_family

__all__ = [
    "AUGMIX_OPS",
    "CLIP_MEAN",
    "CLIP_STD",
    "AugMix",
    "AugMixPlan",
    "AugOp",
    "TPTViews",
    "model_preprocess_cfg",
    "preprocess_settings",
    "view_transform_for",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

from .augmix import AUGMIX_OPS, AugMix, AugMixPlan, AugOp, _rand, _sample_beta, _sample_dirichlet, _sample_gamma  # noqa: F401  (re-exported)

# ----------------------------------------------------------------------------------------------
# TPT views
# ----------------------------------------------------------------------------------------------


def _random_resized_crop_params(
    height: int,
    width: int,
    generator: torch.Generator | None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) with the sampling rule of torchvision's RandomResizedCrop defaults.

    Re-implemented only to draw from ``generator`` (torchvision's draws from the global RNG).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = _rand((2,), generator)
        target_area = area * (scale[0] + (scale[1] - scale[0]) * float(u[0]))
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * float(u[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            u2 = _rand((2,), generator)
            top = min(int(float(u2[0]) * (height - h + 1)), height - h)
            left = min(int(float(u2[1]) * (width - w + 1)), width - w)
            return top, left, h, w
    # Fallback: the largest centred crop whose aspect ratio is within bounds.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _as_input(image: Image.Image | Tensor) -> Image.Image | Tensor:
    """RGB PIL image, or a float (3, H, W) tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not isinstance(image, Tensor):
        raise TypeError(f"expected a PIL image or a (3, H, W) tensor, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()


def _to_float(img: Image.Image | Tensor) -> Tensor:
    if isinstance(img, Image.Image):
        return TF.pil_to_tensor(img).float() / 255.0
    # Bicubic resampling of a float tensor can overshoot; keep the [0, 1] range of an image.
    return img.clamp(0.0, 1.0)


RESIZE_MODES: tuple[str, ...] = ("shortest", "longest", "squash")


class TPTViews:
    """The ``n_views`` views of one test image, as a normalised float batch (n_views, 3, R, R).

    View 0 is the model's own evaluation preprocessing (open_clip's ``resize_mode``: by default a
    resize of the shorter side to R with ``interpolation`` and a centre crop), so with one view it
    equals ``preprocess(image)``. Views 1..: RandomResizedCrop(R) (``crop_scale``, default (0.08, 1);
    DMN-ZS keeps (0.5, 1); default ratio, bilinear)
    and a random horizontal flip of the original image, then AugMix (severity ``severity``, width
    3, depth 1-3) if ``augmix``. Every view is normalised with ``mean``/``std``, the model's own
    statistics. PIL inputs are resized with PIL, exactly as the published pipeline does; tensors
    with torchvision's antialiased tensor resize.
    """

    def __init__(
        self,
        n_views: int = 64,
        resolution: int = 224,
        augmix: bool = True,
        severity: int = 1,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        fill_color: int = 0,
        crop_scale: tuple[float, float] = (0.08, 1.0),
    ) -> None:
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.n_views = n_views
        self.resolution = resolution
        self.augmix = AugMix(severity=severity) if augmix else None
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.fill_color = fill_color
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))

    def __repr__(self) -> str:
        return (
            f"TPTViews(n_views={self.n_views}, resolution={self.resolution}, "
            f"augmix={self.augmix!r}, mean={self.mean}, std={self.std}, "
            f"interpolation={self.interpolation!r}, resize_mode={self.resize_mode!r}, crop_scale={self.crop_scale})"
        )

    @property
    def _interpolation_mode(self) -> InterpolationMode:
        # open_clip's rule: 'bilinear' is bilinear, anything else ('bicubic', 'random') bicubic
        return InterpolationMode.BILINEAR if self.interpolation == "bilinear" else InterpolationMode.BICUBIC

    def base_view(self, image: Image.Image | Tensor) -> Tensor:
        """View 0 in [0, 1], not normalised: the model's evaluation resize and crop."""
        img = _as_input(image)
        r, mode = self.resolution, self._interpolation_mode
        if self.resize_mode == "squash":
            return _to_float(TF.resize(img, [r, r], interpolation=mode, antialias=True))
        if self.resize_mode == "longest":
            from open_clip.transform import CenterCropOrPad, ResizeKeepRatio

            resized = ResizeKeepRatio(r, interpolation=mode, longest=1)(img)
            return _to_float(CenterCropOrPad(r, fill=self.fill_color)(resized))
        resized = TF.resize(img, r, interpolation=mode, antialias=True)
        return _to_float(TF.center_crop(resized, [r, r]))

    def crops(
        self,
        image: Image.Image | Tensor,
        n: int,
        generator: torch.Generator | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """``n`` random resized crops (bilinear) with random flips, float in [0, 1], (n, 3, R, R).

        Written into ``out`` when given (a preallocated (n, 3, R, R) float tensor).
        """
        img = _as_input(image)
        width, height = img.size if isinstance(img, Image.Image) else (img.shape[-1], img.shape[-2])
        r = self.resolution
        if out is None:
            out = torch.empty(n, 3, r, r, device=img.device if isinstance(img, Tensor) else "cpu")
        for k in range(n):
            top, left, h, w = _random_resized_crop_params(height, width, generator, self.crop_scale)
            crop = _to_float(TF.resized_crop(img, top, left, h, w, [r, r], InterpolationMode.BILINEAR, antialias=True))
            if float(_rand((1,), generator)[0]) < 0.5:
                crop = crop.flip(-1)
            out[k] = crop
        return out

    def __call__(self, image: Image.Image | Tensor, generator: torch.Generator | None = None) -> Tensor:
        """All views of ``image``, normalised, shape (n_views, 3, R, R), float32."""
        img = _as_input(image)
        r = self.resolution
        out = torch.empty(self.n_views, 3, r, r, device=img.device if isinstance(img, Tensor) else "cpu")
        out[0] = self.base_view(img)
        if self.n_views > 1:
            crops = self.crops(img, self.n_views - 1, generator, out=out[1:])
            if self.augmix is not None:
                plan = self.augmix.sample_plan(crops.shape[0], (r, r), generator)
                self.augmix.apply_plan(crops, plan, out=crops)
        # Normalising after the mix equals mixing normalised tensors, as TPT does: the mix weights
        # sum to 1 and normalisation is affine.
        mean = torch.tensor(self.mean, dtype=out.dtype, device=out.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=out.dtype, device=out.device).view(1, 3, 1, 1)
        return out.sub_(mean).div_(std)


def view_transform_for(dataset_name: str, n_views: int = 64, resolution: int = 224) -> TPTViews:
    """TPT views for a dataset: crops and flips only for ImageNet and its variants, AugMix otherwise."""
    return TPTViews(n_views=n_views, resolution=resolution, augmix=not is_imagenet_family(dataset_name))


def preprocess_settings(preprocess_cfg: Mapping[str, Any] | Any | None) -> dict[str, Any]:
    """The view settings of an open_clip preprocess config (a dict, a ``PreprocessCfg`` or None).

    ``None`` gives OpenAI CLIP's (224 px, bicubic, shortest side, CLIP mean/std). Only square input
    sizes are supported (every CLIP image tower in open_clip has one).
    """
    cfg = dict(vars(preprocess_cfg)) if preprocess_cfg is not None and not isinstance(preprocess_cfg, Mapping) else dict(preprocess_cfg or {})
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"test-time views need a square input size, the model's is {tuple(size)}")
        size = size[0]
    return {
        "resolution": int(size),
        "mean": tuple(cfg.get("mean") or CLIP_MEAN),
        "std": tuple(cfg.get("std") or CLIP_STD),
        "interpolation": cfg.get("interpolation") or "bicubic",
        "resize_mode": cfg.get("resize_mode") or "shortest",
        "fill_color": int(cfg.get("fill_color", 0) or 0),
    }


def model_preprocess_cfg(model: Any) -> dict[str, Any]:
    """open_clip's preprocess config of ``model`` (mean, std, size, interpolation, resize mode)."""
    import open_clip

    return dict(open_clip.get_model_preprocess_cfg(model))
