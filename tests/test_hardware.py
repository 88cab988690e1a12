"""``--precision auto`` by the CPU's capability, the capability recorded, and the image-feature memo.

The CPU's flags are replaced by hand-written ones, so each rule is tested on every kind of CPU
whatever this machine is: an AVX2-only x86 (emulated bf16, ~70x slower than fp32), an x86 with
``avx512_bf16`` or AMX, an Arm CPU with the ``bf16`` extension.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TEST_TIMEOUT
from protext import hardware

AVX2_ONLY = frozenset({"fpu", "sse2", "avx", "avx2", "fma", "avx512f"})  # avx512f alone is not bf16
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
COOPER_LAKE = frozenset({"avx2", "avx512f", "avx512_bf16"})
NEOVERSE_V1 = frozenset({"fp", "asimd", "sve", "bf16", "i8mm"})


def _cpu(monkeypatch, flags: frozenset) -> None:
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: flags)


@pytest.mark.parametrize(
    "flags, expected, named",
    [
        (AVX2_ONLY, "fp32", []),
        (frozenset(), "fp32", []),  # flags unreadable (not Linux): never assume bf16
        (COOPER_LAKE, "bf16", ["avx512_bf16"]),
        (SAPPHIRE_RAPIDS, "bf16", ["avx512_bf16", "amx_bf16"]),
        (NEOVERSE_V1, "bf16", ["bf16"]),
    ],
)
def test_auto_precision_on_a_cpu_follows_its_native_bf16(monkeypatch, flags, expected, named):
    _cpu(monkeypatch, flags)
    precision, why = hardware.auto_precision("cpu")
    assert precision == expected
    assert hardware.native_bf16_flags() == named
    assert hardware.has_native_bf16() is bool(named)
    assert "\n" not in why
    if named:
        assert all(flag in why for flag in named)
    else:
        assert "no native bfloat16" in why


@pytest.mark.parametrize("flags", [AVX2_ONLY, SAPPHIRE_RAPIDS])
def test_auto_precision_on_cuda_is_fp16_whatever_the_cpu(monkeypatch, flags):
    _cpu(monkeypatch, flags)
    assert hardware.auto_precision("cuda")[0] == "fp16"


def test_cpu_capability_names_the_facts_a_timing_depends_on(monkeypatch):
    _cpu(monkeypatch, COOPER_LAKE)
    cap = hardware.cpu_capability()
    assert cap["native_bf16"] is True and cap["native_bf16_flags"] == ["avx512_bf16"]
    assert cap["torch_kernels"] == torch.backends.cpu.get_cpu_capability()  # torch is imported here
    assert isinstance(cap["cores"], int) and cap["cores"] >= 1
    assert json.loads(json.dumps(cap)) == cap  # results are JSON
    phrase = hardware.describe_cpu(cap)
    assert "native bf16 (avx512_bf16)" in phrase and f"{cap['cores']} cores" in phrase
    _cpu(monkeypatch, AVX2_ONLY)
    assert hardware.describe_cpu().endswith("no native bf16")


def test_capability_reads_this_machines_real_flags():
    """The real /proc/cpuinfo parse: on Linux x86 the flags line is found (sse2 is in every x86-64)."""
    import platform

    hardware._cpuinfo.cache_clear()
    hardware._cpu_flags.cache_clear()
    flags = hardware._cpu_flags()
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        assert "sse2" in flags
    assert hardware.has_native_bf16() == any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))


def test_hardware_needs_no_torch():
    """The precision decision and the capability record run before any model loads, without torch."""
    import subprocess
    import sys

    code = ("import sys; from protext import hardware; hardware.auto_precision('cpu'); "
            "c = hardware.cpu_capability(); assert c['torch_kernels'] is None, c; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=TEST_TIMEOUT)


@pytest.mark.parametrize("flags, expected", [(AVX2_ONLY, "fp32"), (SAPPHIRE_RAPIDS, "bf16")])
def test_eval_auto_precision_is_decided_by_the_cpu_and_said_in_one_line(monkeypatch, capsys, flags, expected):
    from protext.distributed import DistContext
    from protext.evaluation.config import EvalConfig
    from protext.evaluation.runtime import resolve_runtime

    _cpu(monkeypatch, flags)
    runtime = resolve_runtime(EvalConfig(dataset="folder", root=".", device="cpu", precision="auto"), DistContext())
    assert runtime.precision == expected
    assert runtime.image_dtype == {"fp32": None, "bf16": torch.bfloat16}[expected]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("precision auto")]
    assert lines == [f"precision auto: {expected} ({hardware.auto_precision('cpu')[1]})"]
    # an explicit precision is obeyed on any CPU, and says nothing
    runtime = resolve_runtime(EvalConfig(dataset="folder", root=".", device="cpu", precision="fp32"), DistContext())
    assert runtime.precision == "fp32" and "precision auto" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the image-feature memo


def _counting(model):
    calls = []
    handle = model.visual.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls, handle


def test_memo_returns_exactly_what_the_tower_computes_and_encodes_each_batch_once(tiny_clip):
    from protext.feature_memo import active_memo, remember_image_features
    from protext.zeroshot import ImageEncoder

    model = tiny_clip.model
    torch.manual_seed(0)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    a = torch.randn(3, 3, size, size)
    b = a.clone()
    b[2, 0, 0, 0] += 1e-3  # one value differs: another batch
    encoder = ImageEncoder(model)
    outside_a, outside_b = encoder(a), encoder(b)
    calls, handle = _counting(model)
    try:
        with remember_image_features() as memo:
            assert active_memo() is memo
            first = encoder(a)
            again = ImageEncoder(model)(a.clone())  # another encoder, same model, same bytes
            other = encoder(b)
        assert active_memo() is None
        after = encoder(a)  # outside the block nothing is remembered
    finally:
        handle.remove()
    assert calls == [3, 3, 3]  # a, b inside; a again outside
    assert memo.hits == 1 and memo.misses == 2 and memo.images_saved == 3
    assert torch.equal(first, outside_a) and torch.equal(again, outside_a) and torch.equal(after, outside_a)
    assert torch.equal(other, outside_b) and not torch.equal(other, outside_a)
    again.zero_()  # a caller changing what it got does not change what is remembered
    with remember_image_features() as memo2:
        encoder(a)
        assert torch.equal(encoder(a), outside_a) and memo2.hits == 1


def test_memo_keeps_precisions_apart(tiny_clip):
    from protext.feature_memo import remember_image_features
    from protext.zeroshot import ImageEncoder

    model = tiny_clip.model
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(2, 3, size, size)
    with remember_image_features() as memo:
        fp32 = ImageEncoder(model)(images)
        bf16 = ImageEncoder(model, torch.bfloat16)(images)
    assert memo.hits == 0 and memo.misses == 2
    assert not torch.equal(fp32, bf16)  # bf16 was really computed, not the fp32 features returned
    assert torch.equal(bf16, ImageEncoder(model, torch.bfloat16)(images))


def test_every_result_records_the_cpu_capability(tmp_path, monkeypatch, tiny_clip):
    from PIL import Image

    from protext.evaluation import EvalConfig, evaluate

    for name, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), colour).save(tmp_path / "imgs" / name / "a.png")
    _cpu(monkeypatch, COOPER_LAKE)
    config = EvalConfig(dataset="folder", root=str(tmp_path / "imgs"), model="tiny-clip", pretrained="random",
                        device="cpu", precision="fp32", method="clip", workers=0, progress=False,
                        out=str(tmp_path / "r.json"))
    payload = evaluate(config, clip=tiny_clip, progress=False)
    cap = payload["runtime"]["cpu_capability"]
    assert cap["native_bf16"] is True and cap["native_bf16_flags"] == ["avx512_bf16"]
    assert cap["torch_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert json.loads((tmp_path / "r.json").read_text())["runtime"]["cpu_capability"] == cap


def test_describe_cpu_reads_the_capability_it_is_given():
    cap = {"cpu": "Test CPU 9000", "cores": 64, "torch_kernels": "AVX512", "native_bf16": True,
           "native_bf16_flags": ["avx512_bf16", "amx_bf16"]}
    assert hardware.describe_cpu(cap) == "Test CPU 9000, 64 cores, AVX512, native bf16 (avx512_bf16, amx_bf16)"
    cap = {**cap, "torch_kernels": None, "native_bf16": False, "native_bf16_flags": []}
    assert hardware.describe_cpu(cap) == "Test CPU 9000, 64 cores, no native bf16"


def test_auto_precision_names_every_native_flag_and_cuda(monkeypatch):
    _cpu(monkeypatch, SAPPHIRE_RAPIDS)
    assert "(avx512_bf16, amx_bf16)" in hardware.auto_precision("cpu")[1]
    assert hardware.auto_precision("cuda")[1].startswith("CUDA: fp16 autocast")


def test_cpu_model_name_is_the_model_name_line():
    """Read independently here: the first ``model name`` line of /proc/cpuinfo (where there is one)."""
    import platform

    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    if not names:
        pytest.skip("this CPU reports no model name")
    assert hardware.cpu_model_name() == names[0]
    assert platform.machine() in hardware.cpu_capability()["machine"]


def test_memo_keys_by_model_dtype_and_counts_every_image_saved():
    """FeatureMemo on its own, with a stand-in encoder: the same bytes under another model, or the same
    bits in another dtype (fp16 vs bf16), are other entries; counts add up over several hits."""
    from protext.feature_memo import FeatureMemo

    memo = FeatureMemo()
    calls = []

    def encoder(tag):
        def encode(x):
            calls.append(tag)
            return torch.full((x.shape[0], 4), float(len(calls)))
        return encode

    model_a, model_b = object(), object()
    half = torch.arange(2 * 3 * 5, dtype=torch.int16).reshape(2, 3, 5).view(torch.float16)
    brain = half.view(torch.bfloat16)  # the very same bits, another dtype
    first = memo.features(model_a, "None", half, encoder("a"))
    assert torch.equal(memo.features(model_a, "None", half.clone(), encoder("a")), first)
    other_model = memo.features(model_b, "None", half, encoder("b"))
    other_dtype = memo.features(model_a, "None", brain, encoder("a"))
    other_precision = memo.features(model_a, "torch.bfloat16", half, encoder("a"))
    assert calls == ["a", "b", "a", "a"]
    assert len({float(t[0, 0]) for t in (first, other_model, other_dtype, other_precision)}) == 4
    for _ in range(3):
        memo.features(model_b, "None", half, encoder("b"))
        memo.features(model_a, "None", brain, encoder("a"))
    assert calls == ["a", "b", "a", "a"]
    assert (memo.hits, memo.misses, memo.images_saved) == (7, 4, 14)  # 2 images per batch, 7 hits
