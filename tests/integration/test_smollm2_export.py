"""The bundled SmolLM2 exports to an artifact of ~1x its fp32 weights whose graphs pass the checker."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from llamatrt.base.artifact.manifest import Manifest
from llamatrt.base.artifact.reader import read_manifest

pytestmark = pytest.mark.slow
SMOLLM2_PARAMS = 134_515_008  # incl. the tied 49152x576 embedding, counted once


def test_smollm2_artifact(smollm2_artifact: Path) -> None:
    manifest = read_manifest(smollm2_artifact)
    assert Manifest.from_json(manifest.to_json()) == manifest
    total = sum(f.stat().st_size for f in smollm2_artifact.rglob("*") if f.is_file())
    assert total <= 1.1 * SMOLLM2_PARAMS * 4
    assert manifest.weights_bytes >= SMOLLM2_PARAMS * 4
    for graph in manifest.graphs.values():
        onnx.checker.check_model(str(smollm2_artifact / graph.path))
    assert manifest.validation["max_abs_logits_error"] <= 1e-3
    assert manifest.eos_token_ids == (2,)
    assert "<|im_start|>" in manifest.tokenizer["chat_template"]
    assert (manifest.batch_size, manifest.prefill_chunk, manifest.max_cache_len) == (1, 128, 1024)
