"""Mutation-testing follow-up for :mod:`protext.templates` (issue 16): the default rule, and the errors a
user or a broken install meets. Templates are copied by hand from PRESETS.md ("Cross-dataset templates")."""

from __future__ import annotations

import sys
import types

import pytest

from protext.errors import UserError
from protext.templates import FROM_RULE, choose_template, ensemble_templates, openai_imagenet_templates, template_for


def test_the_default_rule_is_protexts():
    assert template_for("dtd") == "a photo of a {}, a type of a texture."
    assert template_for("eurosat") == "a photo of a centered satellite photo of {}."
    assert template_for("ucf101") == "a photo of a {}."  # ProText keeps the default on UCF101, CoOp does not
    decision = choose_template("food101")
    assert (decision.template, decision.source) == ("a photo of a {}, a type of food.", FROM_RULE)


def test_an_unknown_rule_names_the_flag_and_every_rule():
    with pytest.raises(UserError) as info:
        template_for("dtd", "clip")
    assert str(info.value) == "--templates must be one of protext, coop, tpt, got 'clip'"


def test_an_unknown_ensemble_names_the_known_ones():
    with pytest.raises(ValueError) as info:
        ensemble_templates("ensemble81")
    assert str(info.value) == "unknown template ensemble 'ensemble81'; expected one of ensemble, ensemble80"


def _fake_metadata(monkeypatch, module) -> None:
    monkeypatch.setitem(sys.modules, "open_clip.zero_shot_metadata", module)


def test_an_open_clip_without_the_list_is_named(monkeypatch):
    _fake_metadata(monkeypatch, None)  # importing it raises ImportError
    with pytest.raises(RuntimeError) as info:
        openai_imagenet_templates()
    assert str(info.value).startswith("open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES is not available: ")


def test_an_open_clip_list_of_another_length_is_refused(monkeypatch):
    fake = types.ModuleType("open_clip.zero_shot_metadata")
    fake.OPENAI_IMAGENET_TEMPLATES = tuple(f"photo {i} of a {{}}." for i in range(79))
    _fake_metadata(monkeypatch, fake)
    with pytest.raises(RuntimeError) as info:
        openai_imagenet_templates()
    assert str(info.value) == "open_clip's OPENAI_IMAGENET_TEMPLATES holds 79 templates, not CLIP's 80."
    fake.OPENAI_IMAGENET_TEMPLATES = tuple(f"photo {i} of a {{}}." for i in range(80))
    assert openai_imagenet_templates()[79] == "photo 79 of a {}."
