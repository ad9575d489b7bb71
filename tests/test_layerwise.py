"""`llamatrt diff --layerwise` and the fp16 safety scan on tiny models: a perturbed layer is named,
an overflowing activation is flagged by name, a clean fp16 graph passes at fp16 tolerances."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llamatrt.exporter.export import ExportOptions
from llamatrt.tools.layerwise import fp16_scan, run_layerwise
from llamatrt.tools.pipeline import export_artifact
from tests.conftest import save_tiny_tokenizer, tiny_hf_model
from tests.safety_helpers import perturb_parameter, run_cli

OPTIONS = {"max_cache_len": 32, "prefill_chunk": 8}


def _hf(folder: Path, scale_layer_up: float | None = None) -> Path:
    model = tiny_hf_model("gqa-llama3")
    if scale_layer_up is not None:
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.mul_(scale_layer_up)
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return _hf(tmp_path_factory.mktemp("lw") / "hf")


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_a_perturbed_weight_is_found_in_its_layer(hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp32"
    export_artifact(hf, out, ExportOptions(**OPTIONS))
    clean = run_layerwise(out)
    assert clean and clean.first_failure is None and len(clean.layers) == 2
    perturb_parameter(out, "model.layers.1.self_attn.qkv_proj.weight", 0.5)
    report = run_layerwise(out)
    assert not report and report.first_failure is not None
    assert report.first_failure.layer == "layer 1" and report.first_failure.op == "MatMul"
    assert report.layers[0][1] <= report.atol < report.layers[1][1]  # layer 0 intact, layer 1 off
    assert all(lo <= hi for _, lo, hi in report.first_failure.inputs) and report.first_failure.inputs


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_a_clean_fp16_graph_passes_at_fp16_tolerance_and_the_scan_finds_nothing(hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    export_artifact(hf, out, ExportOptions(dtype="fp16", **OPTIONS))
    report = run_layerwise(out)
    assert report, str(report)
    assert report.compared > 50 and report.dtype == "float16"
    assert fp16_scan(out) == []


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_an_overflowing_activation_is_flagged_by_the_scan_and_at_export(tmp_path: Path) -> None:
    hf = _hf(tmp_path / "hot", scale_layer_up=25000.0)
    result = run_cli(
        [
            "export",
            "--model",
            str(hf),
            "--out",
            str(tmp_path / "fp16"),
            "--dtype",
            "fp16",
            "--no-validate",
            "--max-seq-len",
            "32",
            "--prefill-chunk",
            "8",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "fp16 safety scan" in line]
    assert len(warnings) == 1 and "layer 0" in warnings[0]
    findings = fp16_scan(tmp_path / "fp16")
    hot = [f for f in findings if f.reason == "near the fp16 maximum"]
    assert hot and all(f.layer == "layer 0" for f in hot[:1]) and hot[0].max_abs >= 65504 / 2
    assert hot[0].tensor in warnings[0]


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_the_cli_prints_the_table_and_writes_the_plot(hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    export_artifact(hf, out, ExportOptions(**OPTIONS))
    result = run_cli(
        ["diff", str(out), "--layerwise", "--graph", "decode", "--plot", str(tmp_path / "l.png")], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "layer 0" in result.stdout and "layer 1" in result.stdout and "PASS" in result.stdout
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
    torch_side = run_cli(["diff", str(out), "--layerwise", "--against", "torch", "--json"], tmp_path)
    payload = json.loads(torch_side.stdout)
    assert torch_side.returncode == 0 and [row["layer"] for row in payload["layers"]] == ["layer 0", "layer 1"]
    no_engines = run_cli(["diff", str(out), "--layerwise", "--against", "onnxruntime"], tmp_path)
    assert "has no engines" in no_engines.stdout and no_engines.returncode == 0
    shutil.rmtree(out)
