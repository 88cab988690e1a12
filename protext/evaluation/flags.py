"""What each evaluation flag accepts: the names, choices and bounds, and the error that refuses a flag.

``python -m protext.eval --help`` builds its parser from the names here, so this module imports no
torch (the test-time methods come from the torch-free registry). The checks that combine flags live
in :mod:`.validation`, the run's name and resume fingerprint in :mod:`.identity`, and the settings
themselves in :mod:`.config` (:class:`~.config.EvalConfig`).
"""

from __future__ import annotations

import os
import re

from ..errors import UserError
# the test-time methods, their options and checks come from one place, the registry (torch-free)
from ..tta import registry as _registry
from ..tta.methods import common as _common

SPLITS = ("all", "base", "novel")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: how the class features are built: one template, CuPL descriptions, learned prompts, or the
#: 7-template ensemble of ZERO+Ensemble (TTA.md §1.6)
METHODS = ("clip", "cupl", "prompts", "ensemble", "ensemble80", "template+cupl", "ensemble+cupl", "ensemble80+cupl",
           "ensemble80+descriptors")
#: class features that pool templates and CuPL descriptions in one mean, as DMN-ZS's and DPE's
#: published ``tip_cupl`` features do (TTA2.md §6, §7): the prompts of a class are its templates
#: (the run's one template, or an ensemble) followed by its descriptions
MIXED_FEATURES = ("template+cupl", "ensemble+cupl", "ensemble80+cupl")
#: TPS's published prototypes (TTA2.md §10): the mean of CLIP's 80 templates and the mean of
#: "{class}, which … {descriptor}" sentences, averaged ("micro" pooling)
TPS_FEATURES = "ensemble80+descriptors"


def uses_descriptions(method: str) -> bool:
    """Whether ``--method`` builds class features from ``--descriptions``."""
    return method == "cupl" or method in MIXED_FEATURES or method == TPS_FEATURES


#: must equal ``protext.templates.TEMPLATE_RULES`` (tested); repeated here so --help needs no import
TEMPLATE_RULES = ("protext", "coop", "tpt")
TTA_INITS = ("handcrafted", "prompts", "coop")
COOP_SUFFIXES = (".pth", ".pt", ".tar")
TTA_METHODS: tuple[str, ...] = _registry.names()
#: methods whose state carries from one image to the next (the stream order matters)
ONLINE_METHODS: tuple[str, ...] = tuple(name for name in TTA_METHODS if _registry.get(name).online)
#: the prompt tuners: they take --tta-init, and start from what it names
PROMPT_TUNERS: tuple[str, ...] = tuple(name for name in TTA_METHODS if _registry.get(name).tunes_prompts)

# Upper bounds of the count flags. Each value is far above any published setting, and what lies
# beyond it cannot finish on any machine: refusing at once beats an out-of-memory error after the
# model has loaded, or a run that never ends. The TTA bounds are the registry's
# (``protext.tta.methods.common``), torch-free like this module.
MAX_TTA_VIEWS = _common.MAX_VIEWS
MAX_TTA_STEPS = _common.MAX_STEPS
MAX_TTA_BATCH = _common.MAX_BATCH
MAX_VIEWS_IN_FLIGHT = _common.MAX_VIEWS_IN_FLIGHT
#: images per zero-shot batch (default 64): 8192 images of 224x224 are 4.9 GB of fp32 pixels
MAX_BATCH_SIZE = 8192
#: streams of an online method, each a full pass over the dataset
MAX_STREAM_SEEDS = 100
#: orders replayed from one encoding (OGA: 100), or tasks of a scenario (StatA: 1000); each is a pass
#: of the method's own arithmetic
MAX_STREAM_RUNS = 10_000
#: StatA's named scenarios (protext.streams holds their settings; repeated so --help needs no import)
SCENARIOS = ("very_low", "low", "medium_64", "medium_1000", "high", "very_high", "all",
             "online-low", "online-medium", "online-high", "online-separate")
#: seeds key torch and numpy generators: numpy refuses negative seeds, torch those of 2**64 and more
MAX_SEED = 2**63 - 1
#: DataLoader processes per available CPU core: more only compete for the cores (and each holds a
#: copy of the dataset), so more are capped with a warning rather than refused (a script written
#: for a large machine still runs on a small one; the number of workers never changes a result)
WORKERS_PER_CORE = 4
#: what --device accepts (as --help says); checked here so a typo needs no torch to be refused
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class EvalError(UserError):
    """An inconsistent combination of evaluation flags; the message names the flags."""


def max_workers() -> int:
    """The most DataLoader processes worth starting here: :data:`WORKERS_PER_CORE` per CPU core
    this process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return WORKERS_PER_CORE * max(1, cores)


def parse_stream_seeds(text: str) -> list[int]:
    """``"1,2,3"`` → ``[1, 2, 3]`` (an argparse ``type``: argparse reports the error as
    ``argument --stream-seeds: ...`` and exits 2)."""
    from argparse import ArgumentTypeError

    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ArgumentTypeError(f"must be comma-separated integers such as 1,2,3, got '{text}'") from None
    if not seeds:
        raise ArgumentTypeError(f"must name at least one integer seed, got '{text}'")
    return seeds
