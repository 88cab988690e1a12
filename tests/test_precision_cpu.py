"""Issue 18, item 1: the published GPU precision paths run on the CPU, checked against hand references.

fp16 autocast and TPT's gradient scaler take the same code on the CPU as on CUDA (``protext.amp``);
these tests run them here: a step skipped on an fp16 overflow, a normal fp16 step equal to a
hand-computed fp32 step within fp16's tolerance, a fresh scaler per image, the ``--tta-batch``
refusal, ZERO's fp16 soft votes on a near-tie that only fp16 rounding creates, and every
``--precision`` value through ``resolve_runtime``. None of it needs a GPU; all of it failed (refused)
before fp16 was allowed on the CPU.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch
import torch.nn as nn

from protext import hardware
from protext.distributed import DistContext
from protext.evaluation import EvalConfig
from protext.evaluation.runtime import resolve_runtime
from protext.prompts import PromptedTextEncoder
from protext.tta import TTAConfig, TTAConfigError, build_adapter
from protext.tta.selection import marginal_entropy
from protext.tta.tpt import PromptTuner, TPTConfig

NAMES = ["cat", "golden retriever", "Great Dane", "ox", "tabby", "a rather long class name"]
LR = 5e-3
ADAMW_DECAY = 0.01  # torch's AdamW default, which TPT keeps


@pytest.fixture(scope="module")
def views() -> torch.Tensor:
    return torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(18))


def deep_encoder(clip) -> PromptedTextEncoder:
    torch.manual_seed(3)
    enc = PromptedTextEncoder(clip.model, clip.tokenizer, NAMES, n_ctx=4, depth=2, ctx_init="a photo of a", template="a photo of a {}.")
    with torch.no_grad():
        enc.deep_prompts.normal_(0, 0.5)
    return enc


class ScaledLossTuner(PromptTuner):
    """TPT whose loss is multiplied by ``factor``: large enough, its fp16 gradients overflow to inf."""

    factor = 1.0

    def _loss(self, selected_logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.factor * marginal_entropy(selected_logits)


class RecordingScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` that records every instance's initial scale and the factor each loss got."""

    made: list["RecordingScaler"] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.initial = kwargs.get("init_scale")
        self.loss_factors: list[float] = []
        RecordingScaler.made.append(self)

    def scale(self, outputs):
        scaled = super().scale(outputs)
        self.loss_factors.append(float(scaled.detach() / outputs.detach()))
        return scaled


def hand_fp32_step(clip, encoder: PromptedTextEncoder, views: torch.Tensor, keep: int) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ALGORITHMS.md §5 written out in fp32: (loss, gradient, prompts after AdamW's first step).

    AdamW's first step, bias-corrected, is ``p·(1 − lr·wd) − lr·g/(√(g²) + eps)``.
    """
    model = clip.model
    with torch.no_grad():
        image = model.encode_image(views)
        image = image / image.norm(dim=-1, keepdim=True)
    params = {"ctx": encoder.ctx, "deep_prompts": encoder.deep_prompts}
    raw = encoder(truncate=False)
    logits = model.logit_scale.exp() * image @ (raw / raw.norm(dim=-1, keepdim=True)).t()
    entropies = [float(-(row.softmax(-1) * row.log_softmax(-1)).sum()) for row in logits.detach()]
    chosen = sorted(range(len(entropies)), key=lambda v: (entropies[v], v))[:keep]
    mean = logits[chosen].softmax(-1).mean(0)
    loss = -(mean * mean.log()).sum()
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    stepped = {k: p.detach() * (1 - LR * ADAMW_DECAY) - LR * grads[k] / (grads[k].abs() + 1e-8) for k, p in params.items()}
    return float(loss.detach()), grads, stepped


# -------------------------------------------------------------------------------------------------- TPT's scaler


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tiny_clip, views):
    """Loss × 1e6, scaled by 1000: the gradient of the text features is far beyond fp16's 65504, so
    the scaler must skip the step (prompts bit-for-bit unchanged) and halve its scale to 500."""
    encoder = deep_encoder(tiny_clip)
    before = encoder.prompt_state()
    tuner = ScaledLossTuner(tiny_clip.model, encoder, TPTConfig(n_views=32, amp=True))
    tuner.factor = 1e6
    out = tuner.adapt(views, return_tuned=True)
    assert out.scales == [(1000.0, 500.0)]
    for key, value in before.items():
        assert torch.equal(out.tuned[key], value), key


def test_fp16_step_equals_a_hand_fp32_step_within_fp16_tolerance(tiny_clip, views):
    """A step that does not overflow: loss within 5e-3 relative (fp16 keeps 11 significant bits, a
    relative 4.9e-4 per rounding, a few dozen roundings deep), and the prompts equal the hand fp32
    AdamW step to 1e-6 wherever the fp32 gradient exceeds 1 % of its largest entry — AdamW's first
    step is ``−lr·sign(g)`` plus decay, and fp16's gradient error cannot flip those signs."""
    encoder = deep_encoder(tiny_clip)
    loss32, grads, want = hand_fp32_step(tiny_clip, deep_encoder(tiny_clip), views, keep=3)
    out = PromptTuner(tiny_clip.model, encoder, TPTConfig(n_views=32, amp=True)).adapt(views, return_tuned=True)
    assert out.scales == [(1000.0, 1000.0)]  # not skipped
    assert out.losses[0] == pytest.approx(loss32, rel=5e-3)
    checked = 0
    for key, g in grads.items():
        clear = g.abs() >= 1e-2 * g.abs().max()
        torch.testing.assert_close(out.tuned[key][clear], want[key][clear], atol=1e-6, rtol=0)
        checked += int(clear.sum())
        assert not torch.equal(out.tuned[key], encoder.prompt_state()[key])  # the step did move them
    assert checked >= 0.8 * sum(g.numel() for g in grads.values())  # most entries are compared


def test_every_image_gets_a_fresh_scaler_starting_at_1000(tiny_clip, views, monkeypatch):
    """Image 1 overflows (its scaler ends at 500); image 2, on the same tuner, must start again at
    1000 and equal a run of image 2 alone, bit for bit."""
    RecordingScaler.made = []
    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    encoder = deep_encoder(tiny_clip)
    tuner = ScaledLossTuner(tiny_clip.model, encoder, TPTConfig(n_views=32, amp=True))
    second = views.flip(0)
    tuner.factor = 1e6
    first_out = tuner.adapt(views)
    tuner.factor = 1.0
    second_out = tuner.adapt(second, return_tuned=True)
    alone = ScaledLossTuner(tiny_clip.model, deep_encoder(tiny_clip), TPTConfig(n_views=32, amp=True)).adapt(second, return_tuned=True)

    assert [s.initial for s in RecordingScaler.made] == [1000.0, 1000.0, 1000.0]
    assert [s.loss_factors for s in RecordingScaler.made] == [[1000.0], [1000.0], [1000.0]]
    assert [s.get_scale() for s in RecordingScaler.made] == [500.0, 1000.0, 1000.0]
    assert first_out.scales == [(1000.0, 500.0)] and second_out.scales == [(1000.0, 1000.0)]
    for key in alone.tuned:
        assert torch.equal(second_out.tuned[key], alone.tuned[key]), key
    assert torch.equal(second_out.logits, alone.logits)


@pytest.mark.parametrize("method", ["tpt", "ctpt"])
def test_tta_batch_with_fp16_is_refused_in_one_line(tiny_clip, method):
    """One scaler for B images would skip every image's step when one overflows: refused, on a CPU too."""
    encoder = deep_encoder(tiny_clip)
    message = r"^--tta-batch with --precision fp16 is not supported for --tta tpt/ctpt; use one or the other\.$"
    with pytest.raises(TTAConfigError, match=message):
        build_adapter(TTAConfig(method=method, batch=2, fp16=True), tiny_clip.model, "dtd", encoder=encoder)
    adapter = build_adapter(TTAConfig(method=method, fp16=True, views=8), tiny_clip.model, "dtd", encoder=encoder)
    assert adapter.tuner.config.amp  # one image at a time with fp16 is built, on the CPU


def test_eval_refuses_tta_batch_with_fp16_before_loading_a_model(tmp_path, capsys):
    """Through the command: the refusal comes from the flags, before any image or model is read."""
    from protext.eval import main

    from PIL import Image

    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "0.png")
    args = ["--dataset", "folder", "--root", str(tmp_path / "imgs"), "--model", "tiny-clip", "--pretrained", "random",
            "--device", "cpu", "--precision", "fp16", "--tta", "tpt", "--tta-batch", "2", "--out", str(tmp_path / "r.json")]
    try:
        code = main(args)
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2
    assert "--tta-batch with --precision fp16 is not supported for --tta tpt/ctpt; use one or the other." in err
    assert "needs CUDA" not in err


# -------------------------------------------------------------------------------------------------- ZERO's fp16 votes


class FeatureModel(nn.Module):
    """A CLIP stand-in whose image feature is pixels ``[0, 0, :3]``, passed through an identity linear
    layer, so that under fp16 autocast a real fp16 matmul runs (exact for fp16-representable inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.visual.weight.copy_(torch.eye(3))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self.dtypes: list[torch.dtype] = []

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        out = self.visual(images[:, 0, 0, :3])
        self.dtypes.append(out.dtype)
        return out


def fp16(x: float) -> float:
    """x rounded to IEEE half precision (round to nearest even), by the struct module, not torch."""
    return struct.unpack("e", struct.pack("e", x))[0]


def test_zero_fp16_votes_split_a_near_tie_that_only_fp16_rounding_creates():
    """Classes e0 and (1, a, 0) with a² = 2e-4: a view along e0 has fp32 cosines 1 and 0.9999 — class 0
    by hard votes — but both round to 1.0 in fp16 (the spacing below 1 is 2⁻¹¹), so the published fp16
    votes give it 0.5/0.5. Ten views: one leaning to class 1 (most confident), two along e0, seven on a
    three-way near-tie (least confident); 3 vote. Hard votes pick class 0; fp16 votes pick class 1."""
    a = math.sqrt(2e-4)
    classes = torch.tensor([[1.0, 0.0, 0.0], [1.0, a, 0.0], [0.0, 0.0, 1.0]])
    features = [[1.0, 1.0, 0.0]] + [[1.0, 0.0, 0.0]] * 2 + [[1.0, 0.0, 1.0]] * 7
    views = torch.zeros(10, 3, 4, 4)
    views[:, 0, 0, :3] = torch.tensor(features)
    model = FeatureModel()

    # hand reference: cosines in float64 by hand, rounded to fp16, softmax(1024 · fp16(cos)) summed
    def cos(f, t):
        return sum(x * y for x, y in zip(f, t)) / math.sqrt(sum(x * x for x in f) * sum(y * y for y in t))

    rows = [[cos(f, t) for t in classes.tolist()] for f in features]
    assert rows[1][0] - rows[1][1] == pytest.approx(1e-4, rel=1e-3) and fp16(rows[1][0]) == fp16(rows[1][1]) == 1.0
    votes = [0.0, 0.0, 0.0]
    for row in rows[:3]:  # the three most confident views (checked by the hard-vote run below)
        weights = [math.exp(1024 * (fp16(c) - max(fp16(x) for x in row))) for c in row]
        for k, w in enumerate(weights):
            votes[k] += w / sum(weights)
    assert votes[0] == pytest.approx(1.0, abs=1e-3) and votes[1] > 1.9  # one vote each to 0, near-two to 1
    votes[1] += 1.0  # the winner's count is raised by one

    soft = build_adapter(TTAConfig(method="zero", fp16=True, zero_votes="fp16"), model, "dtd", text_features=classes).adapt(views)
    assert model.dtypes == [torch.float16]  # the image tower ran under fp16 autocast, on the CPU
    torch.testing.assert_close(soft.logits, torch.tensor(votes), atol=1e-6, rtol=0)
    assert int(soft.logits.argmax()) == 1

    hard = build_adapter(TTAConfig(method="zero", fp16=True), model, "dtd", text_features=classes).adapt(views)
    assert hard.logits.tolist() == [3.0, 1.0, 0.0]  # views 1-2 vote class 0 in fp32, view 0 class 1


def test_tda_with_fp16_image_encoding_caches_fp32_features_of_the_fp16_tower(tiny_clip):
    """TDA's cache under --precision fp16: features come from the fp16-autocast image tower (written
    out by hand here) and are cached in fp32 (protext computes the affinities in fp32)."""
    model = tiny_clip.model
    views = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    classes = torch.nn.functional.normalize(torch.randn(4, model.text_projection.shape[1], generator=torch.Generator().manual_seed(6)), dim=-1)
    adapter = build_adapter(TTAConfig(method="tda", fp16=True), model, "imagenet", text_features=classes)
    adapter.adapt(views)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        raw = model.encode_image(views)
    want = raw.float() / raw.float().norm(dim=-1, keepdim=True)
    entries = [e for entries in adapter.positive.entries.values() for e in entries]
    assert len(entries) == 1 and entries[0].feature.dtype == torch.float32
    torch.testing.assert_close(entries[0].feature, want[0], atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------------- --precision


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("precision,dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16), ("auto", "auto")])
def test_every_precision_resolves_on_the_cpu(monkeypatch, capsys, precision, dtype, native):
    """fp32, bf16 and fp16 are taken as asked (fp16 with one line saying it is the emulated GPU
    arithmetic); auto follows protext.hardware: bf16 only on a CPU with native bf16, else fp32."""
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"} if native else {"avx2"}))
    config = EvalConfig(dataset="folder", root="unused", device="cpu", precision=precision)
    runtime = resolve_runtime(config, DistContext())
    err = capsys.readouterr().err
    if precision == "auto":
        precision, dtype = ("bf16", torch.bfloat16) if native else ("fp32", None)
        assert err.startswith(f"precision auto: {precision} (")
    assert runtime.device == torch.device("cpu")
    assert (runtime.precision, runtime.image_dtype, runtime.fp16) == (precision, dtype, precision == "fp16")
    lines = [line for line in err.splitlines() if "fp16 on the CPU" in line]
    if precision == "fp16":
        assert lines == [
            "precision fp16 on the CPU: the published GPU arithmetic (fp16 autocast, TPT's gradient scaler) runs here "
            "as on a GPU but emulated and far slower than fp32; meant for checking that arithmetic, not for speed "
            "(use fp32 or auto here)."
        ]
    else:
        assert lines == []


def test_fp16_note_is_said_by_the_main_process_only(capsys):
    config = EvalConfig(dataset="folder", root="unused", device="cpu", precision="fp16")
    assert resolve_runtime(config, DistContext(rank=1, world_size=2)).fp16
    assert capsys.readouterr().err == ""
