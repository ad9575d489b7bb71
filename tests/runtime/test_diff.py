"""`llamatrt diff` passes a good artifact and fails ones broken on purpose, naming what broke."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llamatrt.exporter.export import ExportOptions
from llamatrt.tools.compare import run_diff
from llamatrt.tools.pipeline import export_artifact
from tests.safety_helpers import perturb_parameter

PROMPTS = [(False, "w5 w17 w42 w8"), (True, "w11 w12"), (False, " ".join(f"w{i % 90 + 3}" for i in range(20)))]
OPTIONS = ExportOptions(batch_size=2, max_cache_len=64, prefill_chunk=8)


def test_good_artifact_passes_with_every_check(tiny_artifact: Path) -> None:
    report = run_diff(tiny_artifact, ["onnxruntime", "torch"], prompts=PROMPTS, steps=8)
    assert report, str(report)
    names = " ".join(c.name for c in report.checks)
    for check in (
        "left padding",
        "chunked prefill",
        "rows at different positions",
        "last cache slot",
        "fully masked row",
    ):
        assert check in names
    assert [s.name for s in report.stages] == ["StaticLlama", "artifact/onnxruntime", "artifact/torch"]
    assert all(s.first_divergence is None and s.top1 == 1.0 for s in report.stages)
    payload = report.to_json()
    assert payload["passed"] and json.dumps(payload) and "| check |" in report.to_markdown()


def _export_broken(tmp_path: Path, hf_dir: Path, name: str) -> Path:
    out = tmp_path / name
    export_artifact(hf_dir, out, ExportOptions(**{**OPTIONS.__dict__, "validate": False}))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["source"] = str(hf_dir.resolve())  # the reference is always the true checkpoint
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_perturbed_weight_fails(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "perturbed"
    shutil.copytree(tiny_artifact, out)
    perturb_parameter(out, "model.layers.1.mlp.down_proj.weight", 0.05)
    report = run_diff(out, ["onnxruntime"], prompts=PROMPTS, steps=8)
    assert not report
    artifact_stage = report.stages[-1]
    assert not artifact_stage.passed and report.stages[0].passed  # StaticLlama reads the checkpoint: fine
    assert any("max abs logits error" in f for f in artifact_stage.failures)
    assert "FAIL" in str(report)


def test_wrong_rope_theta_fails(tiny_artifact: Path, tmp_path: Path) -> None:
    hf_dir = tiny_artifact.parent / "hf"
    wrong = tmp_path / "hf-wrong-theta"
    shutil.copytree(hf_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 10000.0  # the checkpoint says 500000
    (wrong / "config.json").write_text(json.dumps(config))
    out = _export_broken(tmp_path, wrong, "theta")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["source"] = str(hf_dir)
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = run_diff(out, ["onnxruntime"], prompts=PROMPTS, steps=8)
    assert not report and not report.stages[-1].passed
    assert any("max abs logits error" in f for f in report.stages[-1].failures)


def test_mask_off_by_one_fails(tiny_artifact: Path, tmp_path: Path, monkeypatch) -> None:
    from llamatrt.models import llama, mask

    def off_by_one(cache_position: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return mask.causal_mask(cache_position - 1, attention_mask)  # a token cannot see itself

    monkeypatch.setattr(llama, "causal_mask", off_by_one)
    out = _export_broken(tmp_path, tiny_artifact.parent / "hf", "mask")
    monkeypatch.undo()
    report = run_diff(out, ["onnxruntime"], prompts=PROMPTS, steps=8)
    assert not report
    failures = " ".join(report.stages[-1].failures)
    assert "max abs logits error" in failures and "greedy tokens diverge at step" in failures


def test_bad_steps() -> None:
    from llamatrt.base.errors import InputError

    with pytest.raises(InputError, match="--steps"):
        run_diff("nowhere", steps=0)
