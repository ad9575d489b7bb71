"""Engine builds: TensorRT-RTX builds both graphs on this CPU-only machine; without TensorRT the
command fails in one line and leaves the artifact as it was."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamatrt.base.artifact.engines import engine_graphs
from llamatrt.base.artifact.reader import read_manifest
from llamatrt.base.errors import ArtifactExistsError
from llamatrt.cli import main
from llamatrt.exporter.trt_build import build_engines

needs_rtx = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx-cu13 not installed (make install)"
)


@pytest.fixture
def artifact(tiny_artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_artifact, tmp_path / "art"))


@needs_rtx
def test_rtx_builds_both_graphs_and_io_matches_manifest(artifact: Path) -> None:
    manifest = build_engines(artifact, "tensorrt-rtx")
    assert read_manifest(artifact) == manifest
    engines = manifest.engines
    assert engines["builder"] == "tensorrt-rtx" and engines["timing_cache"] == "timing.cache"
    assert (artifact / "timing.cache").stat().st_size > 0
    assert set(engines["graphs"]) == set(engine_graphs(manifest)) == {"prefill", "decode"}
    for name, graph in engine_graphs(manifest).items():
        entry = engines["graphs"][name]
        assert (artifact / entry["path"]).stat().st_size == entry["bytes"] > 0
        assert entry["io"]["inputs"] == [t.to_json() for t in graph.inputs]
        assert entry["io"]["outputs"] == [t.to_json() for t in graph.outputs]
        assert entry["kv_cache_update_layers"] == 2 * manifest.config.num_layers  # in-place cache writes
    with pytest.raises(ArtifactExistsError, match="pass --force"):
        build_engines(artifact, "tensorrt-rtx")
    rebuilt = build_engines(artifact, "tensorrt-rtx", force=True)  # reuses the persisted timing cache
    assert rebuilt.engines["graphs"]["decode"]["bytes"] > 0


@needs_rtx
def test_rtx_builds_fp16_graphs(tiny_artifact: Path, tmp_path: Path) -> None:
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.tools.pipeline import export_artifact

    out = tmp_path / "fp16"
    export_artifact(tiny_artifact.parent / "hf", out, ExportOptions(max_cache_len=32, prefill_chunk=8, dtype="fp16"))
    manifest = build_engines(out, "tensorrt-rtx")
    assert manifest.engines["graphs"]["prefill"]["io"]["inputs"][4]["dtype"] == "float16"


def test_build_without_tensorrt_is_one_line_and_changes_nothing(artifact: Path) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    before = {p.name: p.stat().st_mtime_ns for p in artifact.iterdir()}
    result = CliRunner().invoke(main, ["build", str(artifact)])
    assert result.exit_code == 1
    assert "TensorRT is not installed" in result.output and "Traceback" not in result.output
    assert {p.name: p.stat().st_mtime_ns for p in artifact.iterdir()} == before
    assert json.loads((artifact / "manifest.json").read_text())["engines"] == {}
