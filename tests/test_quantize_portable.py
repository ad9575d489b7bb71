"""int4 artifacts for TensorRT: the portable graphs hold the same int4 blocks as ONNX Runtime's graph
(as DequantizeLinear feeding MatMul), compute the same logits, and TensorRT-RTX builds every
DequantizeLinear as a weight-only quantized layer on this CPU-only machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from llamatrt.base.artifact.engines import engine_graphs
from llamatrt.exporter.export import ExportOptions
from llamatrt.exporter.trt_build import build_engines
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.ort_backend import OrtBackend
from llamatrt.tools.pipeline import export_artifact
from llamatrt.tools.teacher_forcing import score
from tests.conftest import save_tiny_tokenizer

OPTIONS = {"max_cache_len": 32, "prefill_chunk": 8}
PROJECTIONS_PER_LAYER = 4  # q|k|v, o, gate|up, down (fused by StaticLlama)


def _tiny_checkpoint(folder: Path, tied: bool) -> Path:
    """A float checkpoint whose every input dimension is a multiple of TensorRT's int4 blocks (64)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=99,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def int4_artifact(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("int4-portable")
    hf = _tiny_checkpoint(root / "hf", tied=request.param)
    export_artifact(hf, root / "art", ExportOptions(quantize="int4", block_size=64, accuracy_level=0, **OPTIONS))
    return root / "art"


def _scores(folder: Path, attention: str) -> list[np.ndarray]:
    from llamatrt.base.artifact.reader import read_manifest

    prompts = [[5, 9, 11, 30, 7], list(range(3, 14))]
    forced = [[40, 41, 42, 43], [8, 7, 6, 5]]
    with OrtBackend(folder, read_manifest(folder), attention=attention) as backend:
        return [s.numpy() for s in score(Generator(backend), prompts, forced)]


def test_the_portable_graphs_hold_the_same_int4_blocks_and_compute_the_same_logits(int4_artifact: Path) -> None:
    from llamatrt.base.artifact.reader import read_manifest

    manifest = read_manifest(int4_artifact)
    portable = {n: g for n, g in manifest.graphs.items() if g.attention == "portable"}
    assert portable and all(g.weights == "int4" for g in portable.values())
    assert set(engine_graphs(manifest)) == set(portable)  # what `build` makes engines of
    assert manifest.quantization["portable"].startswith("DequantizeLinear int4 blocks of 64")
    for graph in portable.values():
        model = onnx.load(str(int4_artifact / graph.path), load_external_data=False)
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) == PROJECTIONS_PER_LAYER * manifest.config.num_layers + 1  # and the head
        assert {next(a.i for a in n.attribute if a.name == "block_size") for n in dq} == {64}
        assert not [
            i.name
            for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT
            and len(i.dims) == 2
            and not i.name.endswith((".dequantized", ".scales.kn"))
        ]  # no float projection
    # validated at export against PyTorch on the dequantized weights, every form
    assert set(manifest.validation["max_abs_logits_error_by_graphs"]) == {"portable", "onnxruntime"}
    fused, standard = _scores(int4_artifact, "onnxruntime"), _scores(int4_artifact, "portable")
    assert max(float(np.abs(a - b).max()) for a, b in zip(fused, standard, strict=True)) < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx-cu13 not installed")
def test_tensorrt_rtx_builds_every_dequantize_as_a_quantized_layer(int4_artifact: Path) -> None:
    manifest = build_engines(int4_artifact, "tensorrt-rtx")
    expected = PROJECTIONS_PER_LAYER * manifest.config.num_layers + 1
    assert {g["dequantize_layers"] for g in manifest.engines["graphs"].values()} == {expected}
    log = (int4_artifact / "build.log").read_text()
    assert f"{expected} DEQUANTIZE layers (weight-only quantized GEMMs) for {expected} DequantizeLinear" in log


def test_gguf_q4_1_blocks_make_no_tensorrt_graphs_and_say_why(tmp_path: Path) -> None:
    from llamatrt.exporter.quant_weights import QuantizedWeight
    from llamatrt.exporter.quantize_portable import tensorrt_can_take

    blocks = np.zeros((4, 2, 16), dtype=np.uint8)
    q4_1 = QuantizedWeight(
        4, 32, 4, 64, blocks, np.ones((4, 2), np.float32), 0, np.zeros((4, 2), np.float32), "gguf Q4_1"
    )
    assert "asymmetric" in (tensorrt_can_take({"w": q4_1}) or "")
    q4_0_32 = QuantizedWeight(4, 32, 4, 64, blocks, np.ones((4, 2), np.float32), 8, None, "gguf Q4_0")
    assert "blocks of 32" in (tensorrt_can_take({"w": q4_0_32}) or "")
