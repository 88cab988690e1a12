"""DMN-ZS (Zhang et al., CVPR'24, "Dual Memory Networks"), zero-shot variant: a dynamic memory
over the test stream (TTA2.md §6).

Online: every image's view-0 feature is written into a per-class memory (at most ``memory_size``
entries, the class being the pseudo-label of its most confident views) *before* the image is
read out; the read-out attends, per class, over that class's memory plus its text feature, and
gives memory probabilities ``p_mem``. The final score is ``p_text + β₂·p_mem`` (view-0 text
probabilities, not a multi-view average). The published runs choose β₂ per dataset by test-set
accuracy after the stream (:func:`oracle_beta2`); the online prediction uses a β₂ fixed up front.
The result depends on the stream order; ``state_dict`` saves the memory so a stream can resume.
The two halves of an image's step are also offered apart, :meth:`DMNAdapter.observe` (the memory
takes the image) and :meth:`DMNAdapter.predict` (the read-out with the memory as it is), for OGA's
batch rule: a whole batch is written before any of its images is read out (TTA2.md §11.1).

Only the dynamic memory exists here: the static (few-shot) memory of DMN is never built with
``--n_shot 0`` [dmn dmn_main.py:461]. All bias/affine terms of the official ``DualMem`` are zeros
and untrained without ``--ft`` [dmn dmn_main.py:892-893], so they are left out.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..zeroshot import ImageEncoder, logit_scale
from .base import AdaptResult, FeatureAdapter, Stopwatch
from .selection import n_confident

__all__ = [
    "BETA2_CANDIDATES",
    "DMNAdapter",
    "DynamicMemory",
    "confident_mean",
    "oracle_beta2",
    "pseudo_label",
]

BETA2_CANDIDATES: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
"""The fusion weights the published code searches on the test labels (§6 step 7) [dmn dmn_main.py:831]."""

SELECTION_EPS = 1e-6
"""``Hv = −Σ p log(p + 1e-6)``: the view entropy of the confidence selection (§6 step 3) [dmn dmn_main.py:109]."""
ENTROPY_EPS = 1e-8
"""``h = −Σ p̄ log(p̄ + 1e-8)``: the entropy stored with a memory entry (§6 step 4) [dmn dmn_main.py:163]."""


def confident_mean(probs: torch.Tensor, fraction: float) -> torch.Tensor:
    """The mean probability vector of the most confident views (§6 step 3) [dmn dmn_main.py:108-113, 756-759].

    Confidence is ``Hv = −Σ p_v log(p_v + 1e-6)`` (DMN's own ε, not a log-softmax entropy), sorted
    ascending; the ``int(n · fraction)`` first views are kept (3 of 32) and their *probabilities*
    averaged. Two departures, both outside the published setting: the sort is stable (the
    published ``argsort`` leaves views of equal entropy in an unspecified order; here index order),
    and at least one view is kept (the published ``int(1 · 0.1) = 0`` would average no view: NaN).

    Args:
        probs: (n_views, n_classes) softmax probabilities, view 0 first.
        fraction: share of views kept.
    """
    entropy = -(probs * torch.log(probs + SELECTION_EPS)).sum(dim=1)
    order = torch.sort(entropy, stable=True).indices
    kept = order[: n_confident(probs.shape[0], fraction)]
    return probs[kept].mean(dim=0)


def pseudo_label(mean_prob: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(ŷ, h)``: the class the memory is written to and the entry's entropy (§6 step 4) [dmn dmn_main.py:156-164].

    ``ŷ = argmax p̄`` (the first index on exact ties, as ``max(0)``); ``h = −Σ p̄ log(p̄ + 1e-8)`` in
    nats, kept as a 0-d tensor in ``p̄``'s dtype (fp32) because the memory compares it in fp32.
    """
    label = int(torch.argmax(mean_prob))
    entropy = -(mean_prob * torch.log(mean_prob + ENTROPY_EPS)).sum()
    return label, entropy


class DynamicMemory:
    """DMN's per-class dynamic memory: ``size`` slots of (key, entropy) per class (§6 State, 5, 6).

    Keys are stored normalised: the published read-out normalises every stored row before use
    [dmn dmn_main.py:224-229] and nothing else reads them, so normalising once at write time gives
    the same keys. Slots fill in insertion order and are never re-sorted; an empty slot (index
    ``≥ counts[c]``) holds a zero key and contributes nothing to the read-out. Empty slots are
    told by the count, where the published code tests ``raw.sum(-1) == 0``: the two differ only
    for a stored feature whose components sum to exactly zero.
    """

    def __init__(self, n_classes: int, size: int, dim: int, device: torch.device | str = "cpu") -> None:
        if size < 1:
            raise ValueError(f"memory_size must be at least 1, got {size}")
        self.size = size
        self.keys = torch.zeros(n_classes, size, dim, device=device)
        self.entropies = torch.zeros(n_classes, size, device=device)
        self.counts = torch.zeros(n_classes, dtype=torch.long)

    def write(self, label: int, feature: torch.Tensor, entropy: torch.Tensor) -> Optional[int]:
        """Store ``feature`` under ``label`` (§6 step 5) [dmn dmn_main.py:165-179]; the slot written, or None.

        * room left: the next free slot;
        * full, and ``entropy`` lower than at least one stored entropy: the slot of the *largest*
          stored entropy. Among equal largest entropies the published unstable ``torch.sort``
          leaves the slot unspecified; here it is the last such slot (what the last index of a
          stable ascending sort would be), so replays are deterministic;
        * full, and not lower than any stored entropy: the sample is dropped.
        """
        count = int(self.counts[label])
        stored = self.entropies[label]
        if count < self.size:
            slot = count
            self.counts[label] = count + 1
        elif bool((entropy < stored).any()):
            slot = int((stored == stored.max()).nonzero()[-1])
        else:
            return None
        self.keys[label, slot] = F.normalize(feature.float(), dim=-1)
        self.entropies[label, slot] = entropy
        return slot

    def read(self, query: torch.Tensor, text: torch.Tensor, beta: float) -> torch.Tensor:
        """Per-class attended features ``a_c`` (n_classes, D) (§6 step 6) [dmn dmn_main.py:182-246].

        Each class attends over its slots plus its text feature as the last entry
        (``K_c = [M_c; t_c]``): ``w_cj = exp(−β(1 − q·k_cj))``, ``a_c = norm(Σ_j w_cj k_cj)`` with
        ``q = norm(query)``. An empty slot gets weight ``exp(−β)`` on a zero key, i.e. nothing; a
        class never written gives ``a_c = norm(t_c)``.

        Args:
            query: the view-0 feature (D,).
            text: normalised class features (n_classes, D).
            beta: the attention sharpness (5.5).
        """
        keys = torch.cat((self.keys, F.normalize(text, dim=1).unsqueeze(1)), dim=1)  # (C, L+1, D)
        q = F.normalize(query, dim=-1)
        weights = torch.exp(-beta * (1.0 - keys @ q))  # (C, L+1)
        attended = (weights.unsqueeze(-1) * keys).sum(dim=1)
        return F.normalize(attended, dim=1)

    def state(self) -> dict[str, Any]:
        """The filled slots only, class by class in slot order (an ImageNet memory is mostly empty
        early in a stream; the full C×L×D tensor would be ~100 MB per checkpoint)."""
        filled = torch.arange(self.size).unsqueeze(0) < self.counts.unsqueeze(1)  # (C, L), on the CPU
        return {
            "counts": self.counts.clone(),
            "keys": self.keys.cpu()[filled],
            "entropies": self.entropies.cpu()[filled],
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`'s output onto this memory's device; an empty dict empties it."""
        device = self.keys.device
        if not state:
            self.keys = torch.zeros(self.keys.shape, device=device)
            self.entropies = torch.zeros(self.entropies.shape, device=device)
            self.counts = torch.zeros(self.counts.shape, dtype=torch.long)
            return
        counts = state["counts"].long().cpu()
        if counts.shape != self.counts.shape or bool((counts > self.size).any()):
            raise ValueError(f"a memory state with counts of shape {tuple(counts.shape)} (at most {int(counts.max())} "
                             f"entries) does not fit {tuple(self.counts.shape)[0]} classes of {self.size} slots")
        filled = torch.arange(self.size).unsqueeze(0) < counts.unsqueeze(1)
        # built on the CPU, where the saved rows are, then moved: the memory's device may be any
        keys, entropies = torch.zeros(self.keys.shape), torch.zeros(self.entropies.shape)
        keys[filled] = state["keys"].float().cpu()
        entropies[filled] = state["entropies"].float().cpu()
        self.keys, self.entropies, self.counts = keys.to(device), entropies.to(device), counts


class DMNAdapter(FeatureAdapter):
    """DMN-ZS on fixed class features (C, D): online, no backward (TTA2.md §6).

    ``logits`` is ``log(p_text + β₂·p_mem)``: its argmax is the fused prediction and its softmax the
    fused score normalised to sum to one, the confidence the calibration reports. The log is
    monotone, so it never reorders two fused scores, but rounded to fp32 it can merge two a few
    ulps apart into a tie (more likely the larger β₂ makes the scores); the exact scores stay in
    ``extras`` (``p_text``, ``p_mem``), from which :func:`oracle_beta2` takes the published
    post-stream choice of β₂. A fused score that underflows to 0 gives the most negative fp32
    (not −inf), so records stay finite.

    Args:
        model: the CLIP model (image tower and temperature; ``exp(logit_scale)`` stands for the 100 of §6).
        class_features: (n_classes, embed_dim), normalised here (``t_c``).
        memory_size: slots per class ``L`` (50) [dmn scripts/run.sh; dmn_main.py:902].
        beta: read-out sharpness β (5.5) [dmn dmn_main.py:891].
        fraction: share of views kept for the pseudo-label (0.1: 3 of 32) [dmn scripts/run.sh].
        beta2: the fusion weight β₂ of the online prediction (1.0, as tta-vlm and OGA).
        image_dtype: image-encoding precision (the published runs are fp32).
    """

    online = True

    def __init__(
        self,
        model: nn.Module,
        class_features: torch.Tensor,
        *,
        memory_size: int = 50,
        beta: float = 5.5,
        fraction: float = 0.1,
        beta2: float = 1.0,
        image_dtype: torch.dtype | None = None,
    ) -> None:
        device = next(model.parameters()).device
        self.classes = F.normalize(class_features.detach().float(), dim=1).to(device)
        self.scale = logit_scale(model).to(device)
        self.beta, self.fraction, self.beta2 = beta, fraction, beta2
        self.image_encoder = ImageEncoder(model, image_dtype)
        self.memory = DynamicMemory(self.classes.shape[0], memory_size, self.classes.shape[1], device)
        self.seen = 0

    def step(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one image into the memory, then read it out: ``(p_text, p_mem)`` (§6 steps 2-6)."""
        features = features.float()
        probs = self.text_probs(features)
        self.write(features, probs)  # step 5: before the read-out
        return probs[0], self.read(features)  # step 7 stores view 0's text probabilities only

    def text_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Every view's text probabilities (n_views, n_classes) (§6 step 2)."""
        return (self.scale * features @ self.classes.t()).softmax(dim=1)

    def write(self, features: torch.Tensor, probs: torch.Tensor) -> None:
        """View 0 into the memory under the pseudo-label of the confident views (§6 steps 3-5)."""
        label, entropy = pseudo_label(confident_mean(probs, self.fraction))
        self.memory.write(label, features[0], entropy)
        self.seen += 1

    def read(self, features: torch.Tensor) -> torch.Tensor:
        """``p_mem`` of the view-0 query from the memory as it is (§6 step 6)."""
        query = features[0]
        attended = self.memory.read(query, self.classes, self.beta)
        return (self.scale * attended @ query).softmax(dim=-1)

    def fused(self, p_text: torch.Tensor, p_mem: torch.Tensor) -> AdaptResult:
        """``log(p_text + β₂·p_mem)`` as the logits, the two parts in ``extras`` (§6 step 7)."""
        fused = p_text + self.beta2 * p_mem  # probabilities not logits
        logits = torch.log(fused).clamp(min=torch.finfo(fused.dtype).min)
        logits = logits.detach().float().cpu()
        extras = {"p_text": p_text.detach().cpu(), "p_mem": p_mem.detach().cpu()}
        return AdaptResult(logits, logits, {}, extras)

    def adapt_features(self, features: torch.Tensor) -> AdaptResult:
        watch = Stopwatch()
        with watch("memory"):
            p_text, p_mem = self.step(features)
            out = self.fused(p_text, p_mem)
        out.timings = watch.timings
        return out

    def observe(self, features: torch.Tensor) -> None:
        """The first half of :meth:`adapt_features`: the memory takes the image (normalised view
        features (n_views, D), view 0 first); nothing is read out. ``observe(f)`` then
        ``predict(f)`` is ``adapt_features(f)``, bit for bit; OGA's batch rule observes a whole batch first."""
        features = features.float()
        self.write(features, self.text_probs(features))

    def predict(self, features: torch.Tensor) -> AdaptResult:
        """The second half of :meth:`adapt_features`: the image's fused score from the memory as it
        is; the memory is left alone."""
        watch = Stopwatch()
        with watch("memory"):
            features = features.float()
            out = self.fused(self.text_probs(features)[0], self.read(features))
        out.timings = watch.timings
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load(state.get("memory", {}))
        self.seen = int(state.get("seen", 0))


def oracle_beta2(
    p_text: torch.Tensor,
    p_mem: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    candidates: Sequence[float] = BETA2_CANDIDATES,
) -> tuple[float, float]:
    """The published post-stream choice of β₂ on the *test labels*: ``(β₂, top-1 %)`` (§6 step 7).

    For each candidate in order, top-1 accuracy of ``argmax(p_text + β₂·p_mem)`` over the stream
    [dmn dmn_main.py:827-862]; a later candidate wins only with a strictly higher accuracy, so
    the first (smallest, in the published order) of equal maxima is kept. This is an oracle:
    offer it only to reproduce the published tables. Accuracy is in percent, as published. When
    every candidate scores 0 the first one is returned (the published code, starting from
    ``best_acc = 0``, would fail on an unset variable).

    Args:
        p_text, p_mem: (n_images, n_classes) per-image probabilities (``AdaptResult.extras``).
        labels: (n_images,) true classes.
        candidates: the β₂ values tried, in order.
    """
    labels = torch.as_tensor(labels).long().cpu()
    if not len(candidates):
        raise ValueError("oracle_beta2 needs at least one candidate")
    if p_text.shape != p_mem.shape or p_text.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise ValueError(f"p_text {tuple(p_text.shape)}, p_mem {tuple(p_mem.shape)} and labels {tuple(labels.shape)} disagree")
    best: Optional[tuple[float, float]] = None
    for beta2 in candidates:
        pred = (p_text + beta2 * p_mem).argmax(dim=1).cpu()
        acc = 100.0 * float((pred == labels).sum()) / labels.shape[0]
        if best is None or acc > best[1]:
            best = (float(beta2), acc)
    assert best is not None  # candidates is not empty
    return best
