"""One template policy (issue 16): :func:`protext.templates.choose_template` decides the template of an
evaluation and of a table cell, and the two callers agree on every cell of every published table."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from protext.evaluation.features import resolve_template
from protext.presets import get_preset, resolve
from protext.protocols import PROTOCOLS
from protext.reproduction import IN_DOMAIN, EvalRequest, LibraryRunner, ReproduceConfig, plan_cells
from protext.templates import CONTEXT_PHRASE, FROM_RULE, FROM_TRAINING, choose_template, template_for

#: how the evaluation words the two outcomes of the policy in its results
EVAL_IN_DOMAIN = "checkpoint (same dataset)"


def test_prompts_on_their_training_dataset_keep_their_training_template():
    decision = choose_template("dtd", "coop", trained_on="dtd", training_template="{}.")
    assert (decision.template, decision.source) == ("{}.", FROM_TRAINING)


def test_prompts_elsewhere_and_no_prompts_take_the_rule():
    for kwargs in ({"trained_on": "imagenet", "training_template": "{}."}, {}, {"trained_on": "dtd"},
                   {"trained_on": "dtd", "training_template": ""}, {"training_template": "{}."}):
        decision = choose_template("dtd", "coop", **kwargs)
        assert (decision.template, decision.source) == ("{} texture.", FROM_RULE), kwargs
    assert choose_template("eurosat", "protext").template == "a photo of a centered satellite photo of {}."
    assert choose_template("eurosat", "tpt").template == "a photo of a {}."


def test_a_dataset_named_by_an_alias_is_the_training_dataset():
    decision = choose_template("dtd", "protext", trained_on="describable", training_template="{}.", aliases=("describable",))
    assert decision.source == FROM_TRAINING


def test_an_unknown_rule_is_refused_only_when_the_rule_is_needed():
    from protext.errors import UserError

    assert choose_template("dtd", "nope", trained_on="dtd", training_template="{}.").source == FROM_TRAINING
    with pytest.raises(UserError, match="--templates must be one of"):
        choose_template("dtd", "nope")


def _checkpoint(cell, coop: Path):
    """What the evaluation reads of the prompts a cell is evaluated with: the metadata training
    writes for the cell's preset, CoOp's for an external CoOp file, nothing for the other cells."""
    if cell.preset:
        meta = {"preset": cell.preset, "preset_values": get_preset(cell.preset).as_dict(),
                "template": resolve(cell.preset).template}
        return SimpleNamespace(meta=meta), Path("prompts.safetensors")
    if cell.external == "coop":
        return SimpleNamespace(meta={"format": "coop", "n_ctx": 16, "depth": 1, "width": 512, "ctx_init": None}), coop
    return None, None


@pytest.mark.parametrize("table", list(PROTOCOLS))
def test_the_planner_and_the_evaluation_decide_alike_on_every_cell(table, tmp_path):
    runner = LibraryRunner(ReproduceConfig(table, str(tmp_path)))
    outcomes = set()
    for cell in plan_cells(PROTOCOLS[table], runner.config):
        checkpoint, path = _checkpoint(cell, tmp_path / "coop.pth")
        config = runner.eval_config(EvalRequest(cell, str(tmp_path), tmp_path / cell.key, path))
        if cell.features.split("+")[0] in ("ensemble", "ensemble80"):  # a template list, not one template: no policy
            assert config.template is None, cell.key
            continue
        # what the evaluation decides on its own, and what it records with the runner's flags
        own = resolve_template(replace(config, template=None), cell.dataset, checkpoint)
        used = resolve_template(config, cell.dataset, checkpoint)
        assert used.template == cell.template, cell.key  # the cell's recorded template is what ran
        assert (own.source == EVAL_IN_DOMAIN) == (cell.template_source == IN_DOMAIN), cell.key
        if cell.template_source == IN_DOMAIN:
            # both keep the training template; the checkpoint saves it short, the table in full
            assert config.template == cell.template == f"{CONTEXT_PHRASE} {own.template}", cell.key
        else:
            assert config.template is None, cell.key  # no --template where the evaluation's rule agrees
            assert own.template == template_for(cell.dataset, cell.template_rule), cell.key
        outcomes.add(cell.template_source == IN_DOMAIN)
    assert outcomes  # every table plans at least one templated cell
