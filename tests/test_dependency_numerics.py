"""The dependency stage's single-layer losses measured on the exported model in onnxruntime
(``search.dependency_numerics: exported``) against known answers: the torch weight-only numbers
for weight-only formats, an independent onnxruntime run for activation formats, and the cache."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from hawqtool import distributed, pipeline
from hawqtool.cache import settings_key
from hawqtool.dependency import DependencyModel, build_dependency_model, exported_single_loss, measured_change
from hawqtool.environment import dependency_key
from hawqtool.errors import RecipeError
from hawqtool.export import QDQExporter
from hawqtool.formats import format_bits, is_quantized, parse_format
from hawqtool.hvp import SplitHessian
from hawqtool.prepare import prepare_model
from hawqtool.recipe import load_recipe
from hawqtool.types import LayerOption, OptionTable


@pytest.fixture(scope="module")
def tiny():
    """The tiny recipe's MLP on digits (256 calibration images), its traces."""
    ws = pipeline.load("tiny", overrides=["hessian.device=cpu"])
    return ws, pipeline.analyze(ws, progress=False)


def workspace(ws: pipeline.Workspace, numerics: str, formats: str) -> pipeline.Workspace:
    recipe = load_recipe(
        "tiny",
        [f"allocation.formats={formats}", f"search.dependency_numerics={numerics}", "hessian.device=cpu"],
    )
    return replace(ws, recipe=recipe)


def dependency(tiny, numerics: str, formats: str):
    ws, table = tiny
    w = workspace(ws, numerics, formats)
    options, _ = pipeline.frontier(w, table=table, progress=False)
    return w, options, pipeline.dependencies(w, options, table, progress=False)


def quantized_keys(dep: DependencyModel) -> list[int]:
    return [i for i, (_, fmt) in enumerate(dep.keys) if is_quantized(fmt)]


def test_weight_only_formats_measure_the_same_in_onnxruntime_as_in_torch(tiny) -> None:
    # DequantizeLinear + float MatMul is the same arithmetic as torch with W + Δ: so the stage takes
    # their own terms from torch and spends no onnxruntime pass on them.
    ws, _, exported = dependency(tiny, "exported", "[int2-w, int4-w, float]")
    _, _, weights = dependency(tiny, "weights", "[int2-w, int4-w, float]")
    assert (weights.numerics, exported.numerics) == ("weights", "exported")
    assert exported.costs["onnx_passes"] == 0 and "onnxruntime" not in exported.own_source
    np.testing.assert_array_equal(exported.measured, weights.measured)
    np.testing.assert_array_equal(exported.matrix, weights.matrix)
    # The premise, measured: onnxruntime's loss change equals torch's for these formats.
    onnx = exported_single_loss(lambda: pipeline.exporter(ws), ws.calibration, ws.loss_fn, threads=2)
    hessian = SplitHessian(ws.prepared, ws.calibration, ws.loss_fn, device="cpu")
    base = onnx({})
    measured_keys = [k for k, src in zip(exported.keys, exported.own_source, strict=True) if src == "torch"]
    assert {fmt for _, fmt in measured_keys} == {"int2-w", "int4-w"}
    for fqn, fmt in measured_keys:
        torch_change = measured_change(hessian, ws.prepared, {fqn: fmt})
        assert abs(torch_change) > 1e-4  # something to compare: not ~0
        assert onnx({fqn: fmt}) - base == pytest.approx(torch_change, rel=1e-5, abs=1e-7)
        assert exported.measured[exported.index(fqn, fmt)] == pytest.approx(torch_change, rel=1e-5, abs=1e-7)


def _independent_loss(ws: pipeline.Workspace, allocation: dict[str, str]) -> float:
    """Export the allocation, run it in a plain onnxruntime session, mean cross-entropy by hand."""
    model = pipeline.exporter(ws).quantized_model(allocation)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    total, n = 0.0, 0
    for x, y in ws.calibration:
        logits = session.run(None, {name: x.numpy().astype(np.float32)})[0]
        total += float(F.cross_entropy(torch.from_numpy(logits), y, reduction="sum"))
        n += len(y)
    return total / n


def test_activation_formats_measure_the_exported_model(tiny) -> None:
    formats = "[int4, int8, float]"
    ws, _, exported = dependency(tiny, "exported", formats)
    _, _, weights = dependency(tiny, "weights", formats)
    assert exported.measured is not None and weights.measured is not None
    activation_keys = [i for i, (_, fmt) in enumerate(exported.keys) if is_quantized(fmt)]
    assert all(parse_format(exported.keys[i][1]).activations for i in activation_keys)
    assert {exported.own_source[i] for i in activation_keys} == {"onnxruntime"}
    assert exported.costs["onnx_passes"] == len(activation_keys) + 1  # and one all-float reference
    missed = {}
    reference = _independent_loss(ws, {})
    for fqn, fmt in [("hidden.0", "int8"), ("head", "int4")]:
        # Out of context: this layer alone quantized, every other float.
        expected = _independent_loss(ws, {fqn: fmt}) - reference
        got = exported.measured[exported.index(fqn, fmt)]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
        missed[(fqn, fmt)] = abs(got - weights.measured[weights.index(fqn, fmt)])
    # The uint8 activations show up; the weight-only torch numbers miss them. How much depends on the
    # CPU's kernels (int8 saturates without VNNI), so the bound is the noise floor at which torch and
    # onnxruntime agree on weight-only formats (the test above: rtol 1e-5, atol 1e-7), with margin.
    for key, gap in missed.items():
        m = abs(weights.measured[weights.index(*key)])
        assert gap > 10 * (1e-5 * m + 1e-7), (key, gap, m)


def test_exported_own_terms_with_the_weights_cross_terms(tiny) -> None:
    # With exported numerics the score's own terms are the exported m_k; the cross terms are
    # weight-error interactions, the same as under weights numerics. Known answer: the two scores
    # differ by the own terms alone.
    formats = "[int4, int8, float]"
    _, options, exported = dependency(tiny, "exported", formats)
    _, _, weights = dependency(tiny, "weights", formats)
    np.testing.assert_array_equal(exported.matrix, weights.matrix)

    def own(d: DependencyModel, alloc: dict[str, str]) -> float:
        assert d.measured is not None
        return float(sum(d.measured[d.index(f, fmt)] for f, fmt in alloc.items()))

    layers = list(options.layers)
    for alloc in (dict.fromkeys(layers, "int4"), {**dict.fromkeys(layers, "int4"), layers[0]: "int8"}):
        cross_exported = exported.score(alloc) - own(exported, alloc)
        cross_weights = weights.score(alloc) - own(weights, alloc)
        assert abs(cross_weights) > 0  # there are cross terms to compare
        assert cross_exported == pytest.approx(cross_weights, rel=1e-9, abs=1e-12)
        assert own(exported, alloc) != own(weights, alloc)  # the activations' error is in the own terms
    # And it survives the cache's JSON round trip.
    again = DependencyModel.from_dict(json.loads(json.dumps(exported.to_dict())))
    np.testing.assert_array_equal(again.measured, exported.measured)
    assert again.own_source == exported.own_source


def test_the_cache_key_names_the_numerics_and_the_model_round_trips(tiny, caplog) -> None:
    ws, table = tiny
    formats = "[int4, int8, float]"
    w_exp, options, dep = dependency(tiny, "exported", formats)
    w_wts = workspace(ws, "weights", formats)
    key_exp = dependency_key(w_exp.recipe, options, table, settings=w_exp.export_settings)
    key_wts = dependency_key(w_wts.recipe, options, table, settings=w_wts.export_settings)
    assert key_exp != key_wts
    # Weight numerics keep the key of the caches written before the setting existed.
    assert key_wts == settings_key(table.fingerprint, options.to_dict(), "dep-v4")
    # A second call loads the cached model: same numbers, same numerics.
    with caplog.at_level(logging.INFO, logger="hawqtool"):
        again = pipeline.dependencies(w_exp, options, table, progress=False)
    assert "dependency terms: cached" in caplog.text
    assert again.numerics == "exported" and again.keys == dep.keys
    np.testing.assert_array_equal(again.measured, dep.measured)
    alloc = dict.fromkeys(options.layers, "int4")
    assert again.score(alloc) == dep.score(alloc)
    # An old cached dict (no numerics) loads as the torch weight-only measurement.
    old = dep.to_dict()
    del old["numerics"]
    assert DependencyModel.from_dict(json.loads(json.dumps(old))).numerics == "weights"


def test_a_bad_numerics_value_names_the_allowed_ones() -> None:
    with pytest.raises(RecipeError, match=r"search.dependency_numerics: .*'exported' or 'weights'"):
        load_recipe("tiny", ["search.dependency_numerics=onnx"])


# --------------------------------------------------------------------------------------------
# Under torch.distributed: each rank takes its share of the measurements
# --------------------------------------------------------------------------------------------


def exported_dependency(model, calib, *, fail_on_rank: int | None = None) -> tuple[DependencyModel, int]:
    """The MLP's dependency model ({int4, int8, float}) with the exported numerics, and how many
    measurements this process took; ``fail_on_rank`` raises in that rank's first one."""
    prepared = prepare_model(model, calib[0][0])
    formats = ("int4", "int8", "float")
    rows = {f: tuple(LayerOption(m, float(format_bits(m)), 0.0, 0.0) for m in formats) for f in prepared.fqns}
    built: list[QDQExporter] = []

    def exporter() -> QDQExporter:
        if not built:
            built.append(QDQExporter.build(prepared, calib))
        return built[0]

    onnx = exported_single_loss(exporter, calib, F.cross_entropy, threads=1)
    calls = [0]

    def loss(allocation: Mapping[str, str]) -> float:
        calls[0] += 1
        if distributed.rank() == fail_on_rank:
            raise RuntimeError(f"rank {fail_on_rank} fails on purpose")
        return onnx(allocation)

    hessian = SplitHessian(prepared, calib, F.cross_entropy, device="cpu")
    options = OptionTable(prepared.fqns, rows, "size")
    dep = build_dependency_model(
        hessian, prepared, options, single_loss=loss, numerics="exported", progress=False
    )
    return dep, calls[0]


# One worker per rank (this file's exported_dependency); rank 0 writes the measurements and how
# many it took. Mode "raise" makes rank 1 fail in its first measurement.
WORKER = r"""
import json, sys
import torch
from hawqtool import distributed

mode, data, out, tests = sys.argv[1:5]
sys.path.insert(0, tests)
distributed.init_from_env(timeout=60)
try:
    from test_dependency_numerics import exported_dependency

    model, calib = torch.load(data, weights_only=False)
    dep, calls = exported_dependency(model, calib, fail_on_rank=1 if mode == "raise" else None)
    if distributed.is_main():
        with open(out, "w") as fh:
            json.dump(
                {
                    "measured": dep.measured.tolist(),
                    "calls": calls,
                    "jobs": dep.forward_passes,
                },
                fh,
            )
finally:
    distributed.shutdown()
"""


@pytest.fixture(scope="module")
def dep_worker(tmp_path_factory: pytest.TempPathFactory, mlp_digits, digits_splits):  # type: ignore[no-untyped-def]
    """Run the worker on ``world`` ranks: exit codes and stderr texts."""
    from test_distributed import _spawn

    folder = tmp_path_factory.mktemp("dep-worker")
    (folder / "worker.py").write_text(WORKER)
    calib = digits_splits.calibration[:2]
    torch.save((mlp_digits, calib), folder / "data.pt")

    def run(mode: str, out: Path, world: int) -> tuple[list[int], list[str]]:
        cmd = [sys.executable, str(folder / "worker.py"), mode, str(folder / "data.pt"), str(out)]
        codes, errs, _ = _spawn([*cmd, str(Path(__file__).parent)], world=world, timeout=120)
        return codes, errs

    return run, mlp_digits, calib


@pytest.mark.slow
def test_two_ranks_share_the_measurements_and_agree_with_one(dep_worker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, model, calib = dep_worker
    codes, errs = run("ok", tmp_path / "two.json", 2)
    assert codes == [0, 0], errs
    two = json.loads((tmp_path / "two.json").read_text())
    one, calls = exported_dependency(model, calib)
    assert calls == two["jobs"] == 7  # the all-float reference + 3 layers × (int4, int8)
    assert one.forward_passes == 7
    assert two["calls"] == 4  # rank 0's share: jobs 0, 2, 4, 6
    np.testing.assert_allclose(two["measured"], one.measured, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_a_rank_failing_in_a_measurement_takes_every_rank_down(dep_worker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = dep_worker[0]
    codes, errs = run("raise", tmp_path / "x.json", 2)
    assert all(c != 0 for c in codes), (codes, errs)
    assert "rank 1 fails on purpose" in errs[1]
    assert "rank(s) 1 failed in the dependency stage's loss passes" in errs[0]
