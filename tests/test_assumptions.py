"""Stages record the settings they assumed, and disagreements are caught where they meet."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hawqtool.errors import UsageError
from hawqtool.pipeline import check_assumptions, stage_settings
from hawqtool.recipe import load_recipe
from hawqtool.types import LayerOption, OptionTable


def _options(settings: dict[str, object]) -> OptionTable:
    opt = (LayerOption("int4", 1.0, 0.1, 0.1), LayerOption("float", 4.0, 0.0, 0.0))
    return OptionTable(("fc",), {"fc": opt}, "size", {"fc": 8}, settings)


def test_stage_settings_come_from_one_place() -> None:
    r = load_recipe("tiny", ["export.int4_storage=container", "export.opset=21"])
    s = stage_settings(r)
    assert (s["int4_storage"], s["opset"], s["clip_search"]) == ("container", 21, True)
    # The option table carries them through JSON (they are part of the dependency cache key).
    assert OptionTable.from_dict(_options(s).to_dict()).settings == s


def test_a_mismatch_between_options_exporter_and_dependency_is_named() -> None:
    opts = _options({"int4_storage": "packed", "opset": 25, "clip_search": True})
    same = SimpleNamespace(int4_storage="packed", opset=25, clip_search=True)
    check_assumptions(opts, same, SimpleNamespace(clip_search=True))  # agrees: no error
    other = SimpleNamespace(int4_storage="container", opset=25, clip_search=True)
    with pytest.raises(UsageError, match=r"exporter.int4_storage: options assumed 'packed', got 'container'"):
        check_assumptions(opts, other, None)
    with pytest.raises(UsageError, match=r"dependency.clip_search: options assumed True, got False"):
        check_assumptions(opts, same, SimpleNamespace(clip_search=False))
