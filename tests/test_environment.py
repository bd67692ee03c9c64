"""What a run's numbers depend on outside the recipe: versions, the CPU, and the dependency cache key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hawqtool.environment import cpu, dependency_key, has_vnni, versions
from hawqtool.recipe import Recipe, load_recipe
from hawqtool.types import ExportSettings, LayerOption, OptionTable, SensitivityTable

OPTIONS = OptionTable(
    ("fc",), {"fc": (LayerOption("int8", 1.0, 1.0, 1.0), LayerOption("float", 4.0, 0.0, 0.0))}, "size"
)
TABLE = SensitivityTable((), 0, "cpu", 0.05, 0, 0.0, fingerprint="traces")


def test_versions_name_the_libraries_and_the_cpu() -> None:
    v = versions()
    assert set(v) == {"hawqtool", "torch", "onnx", "onnxruntime", "cpu"} and v["cpu"] == cpu()
    if Path("/proc/cpuinfo").is_file():
        assert cpu().endswith("(VNNI)") is has_vnni() and cpu().endswith("(no VNNI)") is not has_vnni()


@pytest.mark.parametrize(
    ("flags", "vnni"),
    [("flags : sse avx512_vnni", True), ("flags : avx_vnni", True), ("flags : avx2", False)],
)
def test_vnni_is_read_off_the_cpu_flags(flags: str, vnni: bool) -> None:
    assert has_vnni(flags) is vnni


def test_exported_numerics_key_on_the_export_settings_and_provider_weights_numerics_do_not() -> None:
    exported = load_recipe("tiny", ["search.dependency_numerics=exported"])
    weights = load_recipe("tiny", ["search.dependency_numerics=weights"])
    s, other = ExportSettings(), ExportSettings(int4_storage="container")

    def key(r: Recipe, settings: ExportSettings) -> str:
        return dependency_key(r, OPTIONS, TABLE, settings=settings)

    assert key(exported, s) != key(exported, other) != key(weights, other)
    assert key(weights, s) == key(weights, other)  # torch numerics: the options carry what matters
    cuda = load_recipe("tiny", ["search.dependency_numerics=exported", "evaluate.provider=cuda"])
    assert key(cuda, s) != key(exported, s)
    assert key(exported, s) == key(load_recipe("tiny", ["search.dependency_numerics=exported"]), s)
