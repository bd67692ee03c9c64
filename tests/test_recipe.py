"""Recipe schema: every built-in validates; bad keys and values are named by dotted path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from hawqtool.errors import RecipeError
from hawqtool.recipe import BUILTIN, Recipe, apply_overrides, builtin_path, load_recipe, parse_recipe

REPO_RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_recipe_validates_and_is_shipped(name: str) -> None:
    r = load_recipe(name)
    assert isinstance(r, Recipe)
    assert r.model is not None and r.data is not None
    assert builtin_path(name).is_file()


def test_repo_recipes_are_the_builtin_ones() -> None:
    assert {p.stem for p in REPO_RECIPES} == set(BUILTIN)
    for p in REPO_RECIPES:
        load_recipe(p)


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


BASE = {"model": {"factory": "hawqtool.zoo:mlp_digits"}, "data": {"factory": "hawqtool.zoo:digits"}}


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        (
            {"budget": {"max_dorp": 0.1, "mode": "absolute"}},
            "budget.max_dorp: unknown key; allowed here: max_drop",
        ),
        ({"hesian": {}}, "hesian: unknown key"),
        ({"budget": {"max_drop": 0.1}}, "budget.mode: required key is missing"),
        ({"budget": {"max_drop": 0.1, "mode": "percent"}}, "budget.mode"),
        (
            {"budget": {"max_drop": 0.01, "min_drop": 0.02, "mode": "absolute"}},
            "min_drop (0.02) must be <= max_drop",
        ),
        ({"allocation": {"formats": ["int4", "fp8"]}}, "unknown format 'fp8'"),
        ({"allocation": {"pins": {"fc": "int1"}}}, "allocation.pins: pin 'fc': unknown format 'int1'"),
        ({"hessian": {"rel_tol": 0}}, "hessian.rel_tol"),
        ({"hessian": {"min_probes": 50, "max_probes": 10}}, "max_probes (10) must be >= min_probes (50)"),
        ({"hessian": {"device": "tpu"}}, "hessian.device"),
        ({"export": {"int4_storage": "zip"}}, "export.int4_storage"),
        (
            {"allocation": {"cost": "speed"}},
            "allocation.cost: unknown cost model 'speed'; allowed: size, bops",
        ),
        ({"task": {"metric": "accuracy"}}, "task.metric: unknown metric 'accuracy'; allowed: top1"),
        ({"task": {"loss": "hinge"}}, "task.loss: unknown loss 'hinge'; allowed: cross_entropy"),
        (
            {"model": {"factory": "x:y", "kwarg": {}}},
            "model.kwarg: unknown key; allowed here: factory, kwargs, checkpoint",
        ),
    ],
)
def test_bad_recipes_name_the_dotted_path(tmp_path: Path, patch: dict, needle: str) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, {**BASE, **patch}))
    assert needle in str(e.value)
    assert e.value.exit_code == 2


def test_overrides_are_parsed_as_yaml_and_validated() -> None:
    r = load_recipe(
        "tiny", ["budget.max_drop=0.05", "allocation.formats=[int8, float]", "hessian.sub_batch=null"]
    )
    assert r.budget.max_drop == 0.05
    assert r.allocation.formats == ("int8", "float")
    assert r.hessian.sub_batch is None
    with pytest.raises(RecipeError, match=r"budget\.max_dorp: unknown key"):
        load_recipe("tiny", ["budget.max_dorp=0.05"])
    with pytest.raises(RecipeError, match=r"expected dotted\.key=value"):
        load_recipe("tiny", ["budget.max_drop"])
    with pytest.raises(RecipeError, match="is not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_formats_are_sorted_by_bits_and_unique() -> None:
    r = parse_recipe({**BASE, "allocation": {"formats": ["float", "int8", "int2"]}})
    assert r.allocation.formats == ("int2", "int8", "float")
    with pytest.raises(RecipeError, match="formats repeat"):
        parse_recipe({**BASE, "allocation": {"formats": ["int8", "int8"]}})


def test_a_folder_named_like_a_builtin_does_not_hide_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # e.g. `hawqtool quantize default --out default` run twice from the same folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    assert load_recipe("default") == load_recipe(builtin_path("default"))
    (tmp_path / "mine").mkdir()
    with pytest.raises(RecipeError, match="'mine' is a folder; give a YAML file"):
        load_recipe("mine")


def test_missing_or_bad_file_is_a_recipe_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping of sections"):
        load_recipe(bad)


@pytest.mark.slow
def test_frontier_grids_reach_the_solver_and_keep_their_bound() -> None:
    """On the tiny recipe (3 layers × 4 formats, a 14-point exact frontier), a cost grid of a
    quarter of the frontier's cost range keeps at most one point per bucket plus the cheapest end,
    at most floor(hi/g) - floor(lo/g) + 2 = 6 points: pruning must happen. What it keeps is within
    the documented bound OPT(T) <= ΣΩ <= OPT(T - n_layers · cost_grid) at every target T."""
    from hawqtool import pipeline
    from hawqtool.frontier import select

    ws = pipeline.load("tiny")
    table = pipeline.analyze(ws, progress=False)
    _, exact = pipeline.frontier(ws, table=table, progress=False)
    lo, hi = exact.points[0].cost, exact.points[-1].cost
    grid = (hi - lo) / 4
    most = math.floor(hi / grid) - math.floor(lo / grid) + 2
    assert exact.cost_grid is None and len(exact) > most  # so the grid must prune

    gridded = pipeline.load("tiny", overrides=[f"allocation.cost_grid={grid}", "allocation.omega_grid=0.5"])
    _, both = pipeline.frontier(gridded, table=table, progress=False)
    assert (both.cost_grid, both.omega_grid) == (grid, 0.5)  # both settings reach the solver

    bounded_ws = pipeline.load("tiny", overrides=[f"allocation.cost_grid={grid}"])
    _, bounded = pipeline.frontier(bounded_ws, table=table, progress=False)
    assert len(bounded) <= most < len(exact)
    n = len(table.layers)
    for point in exact.points:  # every exact point's cost is a target T with OPT(T) = its ΣΩ
        got = select(bounded, max_cost=point.cost).omega
        assert got >= point.omega * (1 - 1e-12)
        if point.cost - n * grid >= lo:
            assert got <= select(exact, max_cost=point.cost - n * grid).omega * (1 + 1e-12)


def test_closed_choices_are_the_ones_their_modules_offer() -> None:
    from typing import get_args

    from hawqtool.evaluate import PROVIDERS
    from hawqtool.export.calibrate import CALIBRATION_METHODS
    from hawqtool.formats import STORAGES
    from hawqtool.recipe import EvaluateSection, ExportSection

    def choices(section: type, key: str) -> set[str]:
        return set(get_args(section.model_fields[key].annotation))  # type: ignore[attr-defined]

    assert choices(EvaluateSection, "provider") == set(PROVIDERS)
    assert choices(ExportSection, "calibration") == set(CALIBRATION_METHODS)
    assert choices(ExportSection, "int4_storage") == set(STORAGES)


def test_a_registered_cost_model_is_a_recipe_value_and_prices_the_frontier(
    request: pytest.FixtureRequest, mlp_digits: Any, digits_splits: Any
) -> None:
    from hawqtool import costs, pipeline
    from hawqtool.formats import parse_format

    class Params:
        name, unit = "params", "weights"

        def layer_cost(self, layer: object, fmt: str) -> float:
            return float(layer.params) * parse_format(fmt).bits / 8  # type: ignore[attr-defined]

        def fingerprint(self) -> str:
            return "params/v1"

    with pytest.raises(RecipeError, match="unknown cost model 'params'"):
        load_recipe("tiny", ["allocation.cost=params"])
    costs.register("params", lambda settings: Params())
    request.addfinalizer(lambda: costs.unregister("params"))
    quick = ["hessian.min_probes=2", "hessian.max_probes=2", "hessian.device=cpu"]
    ws = pipeline.load(
        "tiny", model=mlp_digits, data=digits_splits, overrides=["allocation.cost=params", *quick]
    )
    options, front = pipeline.frontier(ws, progress=False)
    params = {layer.fqn: layer.params for layer in ws.prepared.layers}
    for point in front.points:
        bits = sum(params[f] * parse_format(fmt).bits / 8 for f, fmt in point.allocation.items())
        assert point.cost == pytest.approx(bits)
    assert options.cost_model == "params"
