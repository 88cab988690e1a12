"""``--device`` resolution, one rule for every command (issue 16): :mod:`protext.devices`.

None of it needs a GPU: CUDA's presence is what ``torch.cuda.is_available`` says, and the tests
set that answer both ways.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TEST_TIMEOUT
from protext.devices import DeviceError, resolve_device, uses_cuda
from protext.errors import UserError

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "--device {}: CUDA is not available on this machine; use --device cpu or auto."


@pytest.fixture
def without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_without_cuda_is_the_cpu(without_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert not uses_cuda("auto")


def test_auto_with_cuda_is_cuda(with_cuda):
    assert resolve_device("auto") == torch.device("cuda")
    assert uses_cuda("auto")


@pytest.mark.parametrize("name", ["cpu", "cpu:0"])
def test_the_cpu_is_the_cpu_either_way(name, monkeypatch):
    for available in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        assert resolve_device(name).type == "cpu"
        assert not uses_cuda(name)


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line_naming_the_flag(name, without_cuda):
    with pytest.raises(DeviceError) as caught:
        resolve_device(name)
    assert str(caught.value) == NO_CUDA.format(name)
    assert isinstance(caught.value, UserError)  # every command prints it as one line and exits 2
    assert uses_cuda(name)  # what it asks for, refused only when resolved


def test_cuda_with_cuda_keeps_its_index(with_cuda):
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:x", ""])
def test_a_name_that_is_no_device_is_refused(name, without_cuda):
    with pytest.raises(DeviceError, match=rf"^--device must be auto, cpu, mps, cuda or cuda:N, got {name!r}\.$"):
        resolve_device(name)


def test_importing_the_module_imports_no_torch():
    code = "import sys, protext.devices; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=TEST_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_training_and_evaluation_resolve_through_it(without_cuda):
    """The training run and the evaluation's runtime give the same refusal, word for word."""
    from protext.distributed import DistContext
    from protext.evaluation import EvalConfig
    from protext.evaluation.runtime import resolve_runtime
    from protext.training import run as training_run

    with pytest.raises(DeviceError, match=f"^{NO_CUDA.format('cuda')}".replace(".", r"\.")):
        resolve_runtime(EvalConfig(dataset="folder", root=".", device="cuda", precision="fp32"), DistContext())
    assert training_run.resolve_device is resolve_device
