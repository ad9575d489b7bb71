"""The SmolLM2 fp32 artifact passes the whole accuracy ladder, contract checks included."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamatrt.tools.compare import run_diff

pytestmark = pytest.mark.slow


def test_smollm2_fp32_artifact_passes_diff(smollm2_artifact: Path) -> None:
    report = run_diff(smollm2_artifact, ["onnxruntime"], steps=8)
    assert report, str(report)
    artifact = report.stages[-1]
    assert artifact.max_abs < 1e-3 and artifact.top1 == 1.0 and artifact.first_divergence is None
    assert abs(artifact.perplexity - report.reference_perplexity) / report.reference_perplexity < 1e-4
    assert {c.name.split(" [")[0] for c in report.checks} == {
        "left padding equals no padding",
        "chunked prefill equals token-by-token",
        "last cache slot works, one more is refused",
        "fully masked row gives no NaN",
    }
