"""load_clip: random, local files (OpenAI archive / state dict, open_clip state dict), tags offline."""

from __future__ import annotations

import copy
import logging
import os
import socket
import warnings

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from protext import models
from protext.models import PretrainedUnavailableError, is_torchscript_archive, load_clip, text_fingerprint
from protext.prompts import PromptedTextEncoder
from protext.text_tower import UnsupportedTextTowerError, encode_tokens

TEXTS = ["a photo of a dog.", "a close-up photo of a striped, zig-zag fabric texture", "x"]


def _activations(model) -> set[type]:
    return {type(block.mlp.gelu) for block in model.transformer.resblocks}


def _fp16_exact(model):
    """A copy whose weights survive the OpenAI builder's fp16 round trip unchanged."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(p.half().float())
    return twin


def test_tiny_clip_is_registered_quickgelu_with_clip_tokenizer(tiny_clip):
    model = tiny_clip.model
    assert model.transformer.width <= 64 and len(model.transformer.resblocks) == 2
    assert _activations(model) == {QuickGELU}
    tokens = tiny_clip.tokenizer(["a photo of a dog."])
    assert tokens.shape == (1, 77)
    assert tokens[0, 0] == 49406 and tokens[0].max() == 49407  # CLIP's SOT / EOT ids
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_random_weights_warn_and_are_seed_deterministic():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        a = load_clip("tiny-clip", "random", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = load_clip("tiny-clip", "random", seed=3)
        c = load_clip("tiny-clip", "random", seed=4)
    assert text_fingerprint(a.model) == text_fingerprint(b.model) != text_fingerprint(c.model)


def test_plain_encoder_cut_at_eot_equals_encode_text(tiny_clip):
    tokens = tiny_clip.tokenizer(TEXTS)
    ref = tiny_clip.model.encode_text(tokens)
    torch.testing.assert_close(encode_tokens(tiny_clip.model, tokens), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(encode_tokens(tiny_clip.model, tokens, truncate=False), ref, atol=1e-6, rtol=0)


def test_openai_torchscript_archive_loads_as_quickgelu(tiny_clip, tmp_path):
    source = _fp16_exact(tiny_clip.model)
    traced = torch.jit.trace(source, (torch.randn(1, 3, 224, 224), tiny_clip.tokenizer(["a dog"])), check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    assert is_torchscript_archive(path)
    with pytest.raises(Exception):  # the trap: weights_only loading refuses TorchScript archives
        torch.load(path, weights_only=True)

    loaded = load_clip("tiny-clip", str(path))
    assert loaded.name == "tiny-clip-quickgelu" and loaded.pretrained == str(path)
    assert _activations(loaded.model) == {QuickGELU}
    tokens = tiny_clip.tokenizer(TEXTS)
    torch.testing.assert_close(loaded.model.encode_text(tokens), source.encode_text(tokens), atol=1e-5, rtol=0)


def test_openai_format_state_dict_file_loads_with_same_features(tiny_clip, tmp_path):
    source = _fp16_exact(tiny_clip.model)
    state = dict(source.state_dict())
    # OpenAI's released state dicts carry these scalars; they mark the format
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "openai_state.pt"
    torch.save(state, path)
    loaded = load_clip("tiny-clip", str(path))
    assert _activations(loaded.model) == {QuickGELU}
    tokens = tiny_clip.tokenizer(TEXTS)
    torch.testing.assert_close(loaded.model.encode_text(tokens), source.encode_text(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_open_clip_state_dict_files_load_exactly(tiny_clip, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = load_clip("tiny-clip", str(path))
    tokens = tiny_clip.tokenizer(TEXTS)
    torch.testing.assert_close(loaded.model.encode_text(tokens), tiny_clip.model.encode_text(tokens), atol=0, rtol=0)
    assert text_fingerprint(loaded.model) == text_fingerprint(tiny_clip.model)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.pt"):
        load_clip("tiny-clip", str(tmp_path / "no_such.pt"))


def test_unknown_tag_and_model_are_named():
    with pytest.raises(ValueError, match="'laion9000'.*Known tags: .*openai"):
        load_clip("ViT-B-16", "laion9000")
    with pytest.raises(ValueError, match="--model 'ViT-Q-99'"):
        load_clip("ViT-Q-99", "random")


def test_offline_tag_fails_with_one_actionable_message(monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(PretrainedUnavailableError) as info:
        load_clip("ViT-B-16", "openai", cache_dir="/nonexistent-protext-cache")
    message = str(info.value)
    assert "--pretrained PATH" in message and "'openai'" in message and "ViT-B-16" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no stack of hub errors


@pytest.mark.parametrize("tag, expected", [("openai", QuickGELU), ("laion2b_s34b_b88k", torch.nn.GELU)])
def test_named_tag_builds_the_activation_its_weights_were_trained_with(monkeypatch, tmp_path, tag, expected):
    """ViT-B-16 + 'openai' must become the QuickGELU variant; LAION weights keep GELU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = open_clip.create_model("ViT-B-16", pretrained=None)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    monkeypatch.setattr(models, "_download", lambda cfg, cache_dir: str(path))  # stands in for the hub
    loaded = load_clip("ViT-B-16", tag)
    assert _activations(loaded.model) == {expected}
    assert loaded.name == ("ViT-B-16-quickgelu" if expected is QuickGELU else "ViT-B-16")


def test_bidirectional_text_tower_is_refused(tiny_clip):
    siglip_like = copy.deepcopy(tiny_clip.model)
    siglip_like.attn_mask = None
    with pytest.raises(UnsupportedTextTowerError, match="bidirectional"):
        PromptedTextEncoder(siglip_like, tiny_clip.tokenizer, ["dog"], depth=1)
    last_pooled = copy.deepcopy(tiny_clip.model)
    last_pooled.text_pool_type = "last"
    with pytest.raises(UnsupportedTextTowerError, match="'last'"):
        PromptedTextEncoder(last_pooled, tiny_clip.tokenizer, ["dog"], depth=1)


def test_plain_state_dict_in_a_gelu_config_warns_once_naming_quickgelu(tmp_path):
    """Such a file may hold OpenAI's QuickGELU weights; the file cannot tell, so the user is told once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = open_clip.create_model("ViT-B-16", pretrained=None)
    path = tmp_path / "openai_saved.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    with pytest.warns(UserWarning, match=r"pass --model ViT-B-16-quickgelu") as caught:
        loaded = load_clip("ViT-B-16", str(path))
    assert _activations(loaded.model) == {torch.nn.GELU}
    assert sum("quickgelu" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a second time nor for the QuickGELU name
        load_clip("ViT-B-16", str(path))
        assert _activations(load_clip("ViT-B-16-quickgelu", str(path)).model) == {QuickGELU}


def test_pickled_object_as_pretrained_is_one_user_error(tiny_clip, tmp_path):
    from protext.errors import UserError

    path = tmp_path / "model_object.pt"
    torch.save({"model": copy.deepcopy(tiny_clip.model)}, path)  # a pickled module, not a state dict
    with pytest.raises(models.WeightsFileError, match=rf"--pretrained {path}: not a weights file .*weights_only") as info:
        load_clip("tiny-clip", str(path))
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_length_batched_encoding_returns_input_order(tiny_clip):
    """Items are grouped by length (each batch sorted), and every row comes back where it was asked."""
    from protext.text_tower import encode_in_length_batches, eot_positions

    texts = ["x", "a much longer sentence about a striped fabric texture", "dog", "a photo of a cat.", "b", "a medium one"]
    tokens = tiny_clip.tokenizer(texts)
    seen = []

    def encode(rows):
        seen.append(eot_positions(tokens[rows]).tolist())
        return encode_tokens(tiny_clip.model, tokens[rows])

    with torch.no_grad():
        got = encode_in_length_batches(eot_positions(tokens), encode, batch_size=4)
        expected = tiny_clip.model.encode_text(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert [len(b) for b in seen] == [4, 2] and seen[0] == sorted(seen[0]) and max(seen[0]) <= min(seen[1])


def test_random_load_leaves_process_logging_as_it_was(monkeypatch, caplog):
    """Loading silences open_clip's own line only; the caller's logging.disable level and filters survive."""
    root = logging.getLogger()
    filters = list(root.filters)
    logging.disable(logging.DEBUG)  # a caller's choice that a process-wide logging.disable(NOTSET) would undo
    try:
        with pytest.warns(UserWarning, match="RANDOM weights"):
            load_clip("tiny-clip", "random")
        assert root.manager.disable == logging.DEBUG and root.filters == filters

        def broken(*args, **kwargs):
            raise RuntimeError("open_clip failed")

        monkeypatch.setattr(open_clip, "create_model_and_transforms", broken)
        with pytest.raises(RuntimeError, match="open_clip failed"), pytest.warns(UserWarning):
            load_clip("tiny-clip", "random")
        assert root.manager.disable == logging.DEBUG and root.filters == filters  # restored on error too
    finally:
        logging.disable(logging.NOTSET)
    # caplog.at_level lifts logging.disable itself (and restores it), so the quiet line is checked apart
    monkeypatch.undo()
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="RANDOM weights"):
        load_clip("tiny-clip", "random")
    assert caplog.records and not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_open_clip_quiet_drops_only_open_clip_records(caplog):
    """The scoped filter matches open_clip's files: other root-logger records in the block still pass."""
    root = logging.getLogger()
    inside = os.path.join(os.path.dirname(open_clip.__file__), "factory.py")

    def record(msg: str, pathname: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.makeLogRecord({"msg": msg, "pathname": pathname, "levelno": level, "name": "root"})

    with caplog.at_level(logging.INFO):
        with models._open_clip_quiet():
            root.handle(record("from the caller", __file__))
            root.handle(record("from open_clip", inside))
            root.handle(record("open_clip error", inside, logging.ERROR))  # above the quiet level
        root.handle(record("open_clip after", inside))
    assert [r.getMessage() for r in caplog.records] == ["from the caller", "open_clip error", "open_clip after"]


def test_offline_download_restores_the_hub_mode_and_logger(monkeypatch):
    """Offline, the hub runs in offline mode for the download only; its flag, env var and logger are put back."""
    import huggingface_hub.constants as hub_constants

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    seen = []

    def download(cfg, cache_dir=None):
        seen.append((hub_constants.HF_HUB_OFFLINE, logging.getLogger("huggingface_hub").level))
        raise OSError("not in the cache")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(open_clip, "download_pretrained", download)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub_log = logging.getLogger("huggingface_hub")
    monkeypatch.setattr(hub_log, "level", logging.INFO)
    with pytest.raises(PretrainedUnavailableError):
        load_clip("ViT-B-16", "openai", cache_dir="/nonexistent-protext-cache")
    assert seen == [(True, logging.ERROR)]  # scoped inside the call
    assert hub_constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ
    assert hub_log.level == logging.INFO
