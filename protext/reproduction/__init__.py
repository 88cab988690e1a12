"""Run a published table (:mod:`protext.protocols`): train what it needs, evaluate every cell, compare.

One table is a plan of cells (row × dataset [× base/novel]). Each cell's settings come from the
protocol alone (features, class split, template rule and the exact template, preset and its n_ctx,
test-time adaptation), so the results say precisely what ran. The work itself is done by a
:class:`CellRunner`: :class:`LibraryRunner` trains with :func:`protext.training.run_training` and
evaluates with :func:`protext.evaluation.evaluate` on one model loaded once; tests plug in a fake.

The package reads like the pipeline, one module per step:

=================  ===========================================================================
``config``         :class:`ReproduceConfig`, its checks and its departures from the paper
``plan``           the table's :class:`Cell` list and each cell's template (``--plan``)
``runner``         the :class:`CellRunner` interface (:class:`PromptJob`, :class:`EvalRequest`)
``run_folder``     :class:`RunFolder`: ``run.json`` and one file per finished cell (resume state)
``availability``   which datasets are under ``--root``; whether ``--coop`` rows can run
``descriptions``   CuPL's descriptions of every class a cell scores or a preset trains on
``table_run``      :func:`reproduce`: pre-flight, then train and evaluate the missing cells
``team``           the ranks of a torchrun job: who checks, computes and writes
``table_math``     the table payload: ours beside the paper's, averages and harmonic means
``render``         ``TABLE.md``
``figure_data``    what the table's pictures show (points, per-run strips), as plain data
``figures``        ``TABLE.cost.png`` and ``TABLE.runs.png``
``backend``        :class:`LibraryRunner`, the adapter onto protext's training and evaluation
=================  ===========================================================================

Everything lands under one output root ``OUT`` (``--out``) and survives a kill:

``OUT/TABLE/run.json``
    what the folder is a run of (table, model, weights, smoke-test caps); a rerun with other
    settings is refused instead of mixing results.
``OUT/TABLE/cells/<row>__<dataset>__<split>.json``
    one file per finished cell, written atomically the moment it finishes; a rerun skips it.
``OUT/prompts/<model>-<weights>-<hash>/<preset>.safetensors`` (+ ``.json``, written last)
    the prompts a preset trained, reused by every cell, every table and every rerun on the same
    weights (the text-only ImageNet prompts serve protext-text-only and protext-dg alike).
``OUT/TABLE/eval/``, ``OUT/TABLE/descriptions/``
    the evaluation's own results and resumable logs, and the CuPL descriptions each dataset was given.
``OUT/TABLE/TABLE.json``, ``OUT/TABLE/TABLE.md``
    rebuilt from the cell files alone, so a killed-and-rerun table ends with the same files as an
    uninterrupted one (machine-dependent numbers, under ``cost``, are read back, never re-measured).
"""

from __future__ import annotations

from .availability import Availability, check_datasets, check_external
from .backend import LibraryRunner, evaluation_template
from .config import MAX_BATCH_SIZE, MAX_WORKERS, SEED_RANGE, ReproduceConfig, ReproduceError
from .descriptions import gather_descriptions
from .plan import ENSEMBLE, ENSEMBLE80, IN_DOMAIN, Cell, cell_template, describe_plan, plan_cells
from .render import render_markdown
from .run_folder import CELL_FORMAT, RUN_FORMAT, RunFolder
from .runner import CellRunner, EvalRequest, PromptJob
from .table_math import TABLE_FORMAT, build_table, harmonic_mean
from .table_run import STOP_AFTER_ENV, TableRun, reproduce

__all__ = [
    "Availability",
    "CELL_FORMAT",
    "Cell",
    "CellRunner",
    "ENSEMBLE",
    "ENSEMBLE80",
    "EvalRequest",
    "IN_DOMAIN",
    "LibraryRunner",
    "MAX_BATCH_SIZE",
    "MAX_WORKERS",
    "PromptJob",
    "RUN_FORMAT",
    "ReproduceConfig",
    "ReproduceError",
    "RunFolder",
    "SEED_RANGE",
    "STOP_AFTER_ENV",
    "TABLE_FORMAT",
    "TableRun",
    "build_table",
    "cell_template",
    "check_datasets",
    "check_external",
    "describe_plan",
    "evaluation_template",
    "gather_descriptions",
    "harmonic_mean",
    "plan_cells",
    "render_markdown",
    "reproduce",
]
