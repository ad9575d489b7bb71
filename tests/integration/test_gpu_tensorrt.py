"""On a GPU machine with TensorRT: SmolLM2 fp16 engines agree with the ONNX Runtime fp32 artifact.

Run with `make test-gpu` (pytest -m gpu). Skipped, naming what is missing, everywhere else.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

import llamatrt
from llamatrt.base.artifact.precision import PRECISIONS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt not installed"),
]
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def fp16_engines(tmp_path_factory) -> Path:
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.exporter.trt_build import build_engines
    from llamatrt.tools.pipeline import export_artifact

    out = tmp_path_factory.mktemp("gpu") / "smollm2-fp16"
    export_artifact("smollm2", out, ExportOptions(dtype="fp16", max_cache_len=512))
    build_engines(out, "tensorrt")
    return out


def test_fp16_engines_match_ort_fp32(fp16_engines: Path, smollm2_artifact: Path) -> None:
    from llamatrt.tools.teacher_forcing import score

    with llamatrt.load(smollm2_artifact, "onnxruntime") as ort_llm:
        reference = ort_llm.generate(PROMPTS, chat=True, max_new_tokens=32)
        ids = [ort_llm.encode(p, chat=True) for p in PROMPTS]
        ref_logits = score(
            ort_llm.generator, ids, [r.token_ids[:8] + [0] * (8 - len(r.token_ids[:8])) for r in reference]
        )
    with llamatrt.load(fp16_engines, "tensorrt") as trt_llm:
        started = time.perf_counter()
        ours = trt_llm.generate(PROMPTS, chat=True, max_new_tokens=32)
        elapsed = time.perf_counter() - started
        logits = score(trt_llm.generator, ids, [r.token_ids[:8] + [0] * (8 - len(r.token_ids[:8])) for r in reference])
    assert [r.token_ids for r in ours] == [r.token_ids for r in reference]
    worst = max(float((a - b).abs().max()) for a, b in zip(ref_logits, logits, strict=True))
    assert worst <= PRECISIONS["float16"].thresholds.max_abs
    tokens = sum(len(r.token_ids) for r in ours)
    print(
        f"TensorRT fp16 decode: {max(r.decode_tokens_per_s for r in ours):.0f} tok/s; {tokens / elapsed:.0f} tok/s overall"
    )
    assert torch.cuda.is_available()
