"""ProText training (ALGORITHMS.md §3): prompts regress frozen description embeddings, no images.

One module per step, in the order a run takes them:

============  ==================================================================================
``job``        :class:`TrainJob` (descriptions, preset, hyper-parameters as fields), its files
               (:func:`side_paths`) and :class:`TrainOutcome`
``preflight``  outputs, the writer lock (:func:`run_lock`), a resumed run's inputs, and the prompts
               fitted to the model's text tower, all before the model loads
``selection``  which classes are trained on (:func:`select_classes`) and their descriptions
``pairs``      the samples: every (class, description) pair (:class:`TextPairs`)
``config``     :class:`TrainConfig` (what the loop reads) and the precision
``loop``       the batch loss, one epoch, :func:`train`
``resume``     the state saved after every epoch and read by ``--resume``
``history``    each epoch's record, the loss history (JSON) and its plot (PNG)
``run``        :func:`run_training`: the steps above, in order, behind ``python -m protext.train``
============  ==================================================================================

Every public name of the former single module is importable from here. Seams: the loop and the run
look up ``fast_batch_loss``, ``shared_prefix_features``, ``save_resume_state`` and ``_load_model``
through this package on every call, so patching ``protext.training.<name>`` (fault injection, the
tests) reaches them as it did when training was one file.
"""

from __future__ import annotations

import torch  # noqa: F401  (protext.training.torch: tests patch torch.optim through it)

from ..digests import file_sha256
from ..shared_prefix import shared_prefix_features, supports_shared_prefix
from .config import DEFAULT_LOSS_WEIGHT, LOSSES, PRECISION_NAMES, PRECISIONS, TrainConfig, TrainJobError, resolve_precision
from .history import EpochRecord, plot_history, write_history
from .job import TrainJob, TrainOutcome, side_paths
from .loop import BatchLoss, EpochHook, NonFiniteLossError, TrainResult, _batches, fast_batch_loss, prompt_loss, train
from .pairs import TextPairs
from .preflight import TrainLockError, check_output_paths, check_resume_inputs, fit_prompts_to_tower, run_lock
from .resume import STATE_FORMAT, ResumeStateError, load_resume_state, run_identity, save_resume_state
from .run import _load_model, run_training
from .selection import MAX_LISTED, ClassSelection, read_samples, select_classes

__all__ = [
    "BatchLoss",
    "ClassSelection",
    "DEFAULT_LOSS_WEIGHT",
    "EpochHook",
    "EpochRecord",
    "LOSSES",
    "MAX_LISTED",
    "NonFiniteLossError",
    "PRECISIONS",
    "PRECISION_NAMES",
    "ResumeStateError",
    "STATE_FORMAT",
    "TextPairs",
    "TrainConfig",
    "TrainJob",
    "TrainJobError",
    "TrainLockError",
    "TrainOutcome",
    "TrainResult",
    "check_output_paths",
    "check_resume_inputs",
    "fast_batch_loss",
    "fit_prompts_to_tower",
    "file_sha256",
    "load_resume_state",
    "plot_history",
    "prompt_loss",
    "read_samples",
    "resolve_precision",
    "run_identity",
    "run_lock",
    "run_training",
    "save_resume_state",
    "select_classes",
    "shared_prefix_features",
    "side_paths",
    "supports_shared_prefix",
    "train",
    "write_history",
]
