"""GFLOPs per image of an evaluation, counted on its real calls (issue 17 item 3).

Counting every call would slow the run (``FlopCounterMode`` sees every operator), so each process
counts a sample on the calls it really makes: **the first batch of images it processes** (each
stream of an online method counts its own), and every piece of work done once per run and reused
for all images (the class text features; TPT's text features at the initialisation, which its first
image computes). :class:`CostMeter` does the counting in :mod:`.loop`; :func:`flops_record` turns
every process's counts into the ``timing.flops`` block of a result:

* ``per_image``: GFLOPs per counted image, split by :data:`protext.flops.PARTS` (image tower, text
  forwards and backwards, the method's own arithmetic), the mean over the counted images;
* ``once_per_run``: the reused work of every process (and stream), in GFLOPs, and the same spread
  over the images of the result (``once_per_image``): zero-shot's class features are counted once
  per process and divided by the images;
* ``gflops_per_image``: the two added, the figure a table shows beside seconds per image;
* ``image_tower_check``: one view through the image tower counted apart, the views that the counted
  images encoded (image-tower GFLOPs / one view's) and open_clip's published profile where it has
  this model at its resolution; ``text_tower_check`` the same for one 77-token prompt.

The counted batch's seconds include the counter's own overhead (Python on every operator).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Callable, Optional, Sequence, TypeVar

from ..flops import PARTS, PUBLISHED_GFLOPS, PartCounter, image_tower_gflops
from ..text_tower import text_gflops

_T = TypeVar("_T")

#: the resolution of open_clip's published profile (``docs/model_profile.csv``) for every entry of
#: :data:`protext.flops.PUBLISHED_GFLOPS`
PUBLISHED_RESOLUTION = 224


@dataclass
class FlopSample:
    """One process's (or one stream's) counts, sent to rank 0 with its results: integer FLOPs."""

    per_images: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))  # summed over counted images
    images: int = 0  # images counted
    once: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))  # work reused for every image

    @property
    def per_image_total(self) -> int:
        """All parts of the counted images, summed (integer FLOPs)."""
        return sum(self.per_images.values())


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for part, flops in counts.items():
        into[part] += flops


class CostMeter:
    """Counts the FLOPs of one process's (or stream's) first batch and of its once-per-run work.

    Args:
        batches: how many batches to count (the first ones this process runs).
    """

    def __init__(self, batches: int = 1) -> None:
        self.batches = batches
        self.sample = FlopSample()
        self._counted_batches = 0

    def once(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)``, all of its FLOPs counted as once per run (e.g. class features)."""
        with PartCounter(all_once=True) as counter:
            out = fn(*args, **kwargs)
        _add(self.sample.once, counter.once)
        _add(self.sample.once, counter.per_call)  # nothing lands here under all_once; kept for exactness
        return out

    def batch(self, fn: Callable[..., Sequence[Any]], *args: Any, **kwargs: Any) -> Sequence[Any]:
        """``fn(*args, **kwargs)``, which returns one prediction per image; counted while the meter
        still samples, else called as it is."""
        if self._counted_batches >= self.batches:
            return fn(*args, **kwargs)
        with PartCounter() as counter:
            out = fn(*args, **kwargs)
        self._counted_batches += 1
        self.sample.images += len(out)
        _add(self.sample.per_images, counter.per_call)
        _add(self.sample.once, counter.once)  # a lazily filled cache (TPT's initial text features)
        return out

    def counting(self, fn: Callable[..., Sequence[Any]]) -> Callable[..., Sequence[Any]]:
        """``fn`` with every call going through :meth:`batch`."""

        def counted(*args: Any, **kwargs: Any) -> Sequence[Any]:
            return self.batch(fn, *args, **kwargs)

        return counted


def _g(flops: float) -> float:
    return flops / 1e9


def _resolution(model: Any) -> int:
    """The square input size of the image tower (open_clip keeps it on ``visual.image_size``)."""
    size = getattr(getattr(model, "visual", model), "image_size", PUBLISHED_RESOLUTION)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _published(model_name: str, kind: str, resolution: Optional[int]) -> Optional[float]:
    entry = PUBLISHED_GFLOPS.get(model_name)
    if entry is None or (resolution is not None and resolution != PUBLISHED_RESOLUTION):
        return None
    return entry[kind]


def _check(counted: float, published: Optional[float]) -> dict[str, Any]:
    return {"published_gflops": published,
            "relative_difference": None if published is None else (counted - published) / published}


def tower_checks(model: Any, model_name: str, image_tower_flops: int, images: int) -> dict[str, Any]:
    """One view and one 77-token prompt counted apart, beside open_clip's published profile, and the
    views each counted image encoded: ``image_tower_flops`` (integer FLOPs of ``images`` images) over
    one view's, a whole number when every image encoded the same views."""
    resolution = _resolution(model)
    view = round(image_tower_gflops(model, resolution) * 1e9)  # an integer count, exact in a double
    views = Fraction(image_tower_flops, images * view) if view and images else None
    image = {"model": model_name, "resolution": resolution, "gflops_per_view": view / 1e9,
             "views_encoded_per_image": None if views is None else int(views) if views.denominator == 1 else float(views),
             **_check(view / 1e9, _published(model_name, "image", resolution)),
             "published_source": "open_clip docs/model_profile.csv (image_gflops, 224 px, 2 FLOPs per multiply-add)"}
    try:
        prompt = text_gflops(model, None)
    except Exception as err:  # a model without a CLIP-style text tower: say so rather than fail the result
        return {"image_tower_check": image, "text_tower_check": {"error": str(err)}}
    text = {"gflops_per_77_token_prompt": prompt, **_check(prompt, _published(model_name, "text", None)),
            "note": "protext cuts each prompt batch at its longest end-of-text token, so its text forwards are "
                    "shorter than 77 tokens"}
    return {"image_tower_check": image, "text_tower_check": text}


RULE = ("FLOPs counted with torch.utils.flop_counter on the real calls (2 per multiply-add; matrix products, "
        "convolutions and attention, as open_clip's profile), protext.flops.PartCounter splitting them by part. "
        "Counted: the first batch of images of each process (and of each stream); per_image is their mean. Work done "
        "once and reused for every image (class text features, TPT's text features at the initialisation) is counted "
        "where it runs, on every process and stream, and divided by the images of the result (once_per_image). "
        "gflops_per_image = per_image + once_per_image. The counted batch's seconds include the counter's overhead.")


def flops_record(samples: Sequence[Optional[FlopSample]], images_processed: int, model: Any,
                 model_name: str) -> dict[str, Any]:
    """The ``timing.flops`` block from every process's and stream's :class:`FlopSample`.

    ``images_processed`` counts every image of every stream (the denominator of the reused work).
    Samples that are ``None`` (a path that does not count) or counted no image leave a note.
    """
    counted = [s for s in samples if s is not None and s.images > 0]
    if not counted:
        reason = ("no image was processed by this run (every one came from the resume log)"
                  if any(s is not None for s in samples) else "this evaluation path does not count FLOPs")
        return {"gflops_per_image": None, "note": f"not counted: {reason}", "rule": RULE}
    images = sum(s.images for s in counted)
    per_image = {p: _g(sum(s.per_images[p] for s in counted) / images) for p in PARTS}
    once = {p: _g(sum(s.once[p] for s in samples if s is not None)) for p in PARTS}
    once_per_image = {p: v / images_processed if images_processed else 0.0 for p, v in once.items()}
    record: dict[str, Any] = {
        "gflops_per_image": sum(per_image.values()) + sum(once_per_image.values()),
        "per_image": per_image,
        "once_per_run": once,
        "once_per_image": once_per_image,
        "images_counted": images,
        "images_in_result": images_processed,
        "counts": [asdict(s) for s in samples if s is not None],  # integer FLOPs, per process and stream
        "rule": RULE,
    }
    record.update(tower_checks(model, model_name, sum(s.per_images["image_tower"] for s in counted), images))
    return record
