"""Garbage in never means a traceback or "budget met": fuzzed recipes and factory outputs end in a
HawqError (exit 2 for bad input) naming the culprit, or load cleanly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hawqtool.errors import HawqError, UsageError
from hawqtool.recipe import apply_overrides, load_recipe, parse_recipe
from hawqtool.workspace import check_budget_resolvable, check_task, load
from hawqtool.zoo import MLP

KEYS = [
    "name",
    "task.loss",
    "task.metric",
    "task.targets",
    "task.output",
    "task.higher_is_better",
    "hessian.rel_tol",
    "hessian.min_probes",
    "hessian.max_probes",
    "hessian.device",
    "hessian.sub_batch",
    "hessian.dtype",
    "allocation.formats",
    "allocation.cost",
    "allocation.pins",
    "budget.max_drop",
    "budget.mode",
    "budget.min_drop",
    "budget.confidence",
    "export.opset",
    "export.int4_storage",
    "evaluate.threads",
    "evaluate.provider",
    "no.such.key",
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["int4", "int4-w", "int4-b32", "int9", "fp16", "float", "top1", "kl", "x:y", "re:(", ""]),
    st.lists(st.sampled_from(["int2", "int4", "int8", "int8-w", "float", "int1", "int4-b7"]), max_size=4),
    st.dictionaries(st.sampled_from(["hidden.0", "head", "re:.*", "nope"]), st.sampled_from(["int8", "bad"])),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_fuzzed_recipe_values_validate_or_name_the_bad_key(pairs: list[tuple[str, object]]) -> None:
    import yaml

    base = load_recipe("tiny").to_dict()
    overrides = [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in pairs
    ]
    try:
        recipe = parse_recipe(apply_overrides(base, overrides))
    except UsageError as e:
        msg = str(e)
        assert any(k.split(".")[0] in msg or k in msg for k, _ in pairs) or "--set" in msg, msg
        return
    # Whatever validates is a recipe that round-trips and whose formats all parse.
    assert parse_recipe(recipe.to_dict()) == recipe
    from hawqtool.formats import parse_format

    for fmt in (*recipe.allocation.formats, *recipe.allocation.pins.values()):
        parse_format(fmt)


def _splits(x: object, y: object) -> dict[str, list[tuple[object, object]]]:
    return {name: [(x, y)] for name in ("calibration", "evaluation", "test")}


BAD_INPUTS = st.sampled_from(
    [
        "nan-inputs",
        "labels-out-of-range",
        "negative-labels",
        "wrong-batch",
        "string-inputs",
        "not-a-pair",
        "float-labels-shape",
        "empty",
        "constant-labels",
        "good",
    ]
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=BAD_INPUTS, seed=st.integers(0, 3))
def test_fuzzed_factory_outputs_stop_before_the_hessian_with_exit_2(kind: str, seed: int, mlp_digits) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    data: object
    if kind == "nan-inputs":
        x[0, 0, 0, 0] = math.nan
        data = _splits(x, y)
    elif kind == "labels-out-of-range":
        data = _splits(x, y + 50)
    elif kind == "negative-labels":
        data = _splits(x, y - 20)
    elif kind == "wrong-batch":
        data = _splits(x, y[:10])
    elif kind == "string-inputs":
        data = _splits("pixels", y)
    elif kind == "not-a-pair":
        data = {name: [x] for name in ("calibration", "evaluation", "test")}
    elif kind == "float-labels-shape":
        data = _splits(x, np.zeros((64, 3, 2)))
    elif kind == "empty":
        data = {name: [] for name in ("calibration", "evaluation", "test")}
    elif kind == "constant-labels":
        # Every label is the most frequent class: a random-weight model cannot beat "chance".
        data = _splits(x, torch.full((64,), 3))
    else:
        data = _splits(x, y)
    model = mlp_digits if kind != "constant-labels" else MLP().eval()
    try:
        ws = load("tiny", model=model, data=data, overrides=["budget.confidence=0"])
        metric, values = check_task(ws)
        check_budget_resolvable(ws, metric, values)
    except HawqError as e:
        assert e.exit_code == 2, (kind, e)
        assert str(e)
        return
    # Only sensible data gets through, and then the float model scores above chance.
    assert kind in ("good", "constant-labels"), kind
    if kind == "good":
        assert metric > 0.1
    else:
        pytest.fail("a model at chance level on constant labels was not stopped")
