"""GPTQ blocks (`export --quantize ... --calibration TEXT`): they cut the product's error on
correlated inputs against round-to-nearest in the very layout MatMulNBits reads, the second moments
computed a layer at a time (and the head's) equal the whole model's, and an export records and
validates them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from llamatrt.exporter.calibration import CALIBRATION_CONTEXT, Calibration
from llamatrt.exporter.export import ExportOptions
from llamatrt.exporter.gptq import gptq_quantize
from llamatrt.exporter.quant_weights import rtn_quantize
from llamatrt.models.checkpoint import load_checkpoint
from llamatrt.tools.pipeline import export_artifact
from tests.conftest import TINY_BASE, TINY_VARIANTS, save_tiny_tokenizer


def _correlated_inputs(k: int, rng: np.random.Generator) -> np.ndarray:
    """Inputs whose channels are mixed and unequally scaled, as a layer's activations are."""
    mixing = np.eye(k) + 0.5 * rng.standard_normal((k, k)) / np.sqrt(k)
    return (rng.standard_normal((2048, k)) @ mixing) * rng.uniform(0.2, 3.0, k)


@pytest.mark.parametrize(("n", "k", "bits"), [(64, 128, 4), (48, 80, 4), (64, 128, 8)])  # 80: a padded block
def test_gptq_cuts_the_products_error_in_round_to_nearests_layout(n: int, k: int, bits: int) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    x = _correlated_inputs(k, rng)
    gptq = gptq_quantize(weight, torch.from_numpy(x.T @ x), bits, 32)
    rtn = rtn_quantize(weight, bits, 32)
    assert gptq.form() == rtn.form() and gptq.packed.shape == rtn.packed.shape and gptq.origin == "gptq"
    codes = gptq.codes()
    assert codes.min() >= 0 and codes.max() < (1 << bits)
    assert (codes.reshape(n, -1)[:, k:] == gptq.zero).all()  # the padding of a last block holds zeros
    assert np.array_equal(gptq.scales, gptq.scales.astype(np.float16))  # fp16 values, as rtn's and a GGUF's

    def error(w: np.ndarray) -> float:
        return float(((x @ (weight - w).T) ** 2).sum())

    assert error(gptq.dequantize()) < 0.75 * error(rtn.dequantize())  # about 0.6 on these inputs


def test_rows_solved_in_chunks_give_the_same_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((50, 96)).astype(np.float32)
    x = _correlated_inputs(96, rng)
    whole = gptq_quantize(weight, torch.from_numpy(x.T @ x), 4, 32)
    monkeypatch.setattr("llamatrt.exporter.gptq.CHUNK_ELEMENTS", 7 * 96)  # 7 rows a chunk, the last one short
    chunked = gptq_quantize(weight, torch.from_numpy(x.T @ x), 4, 32)
    assert np.array_equal(whole.packed, chunked.packed) and np.array_equal(whole.scales, chunked.scales)


def test_an_input_that_never_fires_zeroes_its_weights_and_leaves_the_rest_finite() -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((16, 64)).astype(np.float32)
    x = _correlated_inputs(64, rng)
    x[:, 5] = 0
    quantized = gptq_quantize(weight, torch.from_numpy(x.T @ x), 4, 32)
    values = quantized.dequantize()
    assert np.isfinite(values).all() and not values[:, 5].any()


def _tiny_folder(tmp_path: Path, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(**{**TINY_BASE, **TINY_VARIANTS["gqa-tied"], "num_hidden_layers": layers})
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    save_tiny_tokenizer(tmp_path / "hf")
    return tmp_path / "hf"


def _calibration_text(tokens: int) -> str:
    rng = np.random.default_rng(2)
    return " ".join(f"w{i}" for i in rng.integers(3, 99, tokens))


def test_second_moments_a_layer_at_a_time_equal_the_whole_models(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    folder = _tiny_folder(tmp_path, layers=3)
    ids = np.random.default_rng(4).integers(3, 99, (10, CALIBRATION_CONTEXT)).tolist()  # 8 a call, then 2
    calibration = Calibration(load_checkpoint(folder), ids)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    moments: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def accumulate(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...], __: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            moments[name] = moments.get(name, 0) + x.T @ x

        return accumulate

    model.lm_head.register_forward_hook(hook("head"))
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj.register_forward_hook(hook(f"model.layers.{i}.self_attn.qkv_proj.weight"))
        layer.self_attn.o_proj.register_forward_hook(hook(f"model.layers.{i}.self_attn.o_proj.weight"))
        layer.mlp.gate_proj.register_forward_hook(hook(f"model.layers.{i}.mlp.gate_up_proj.weight"))
        layer.mlp.down_proj.register_forward_hook(hook(f"model.layers.{i}.mlp.down_proj.weight"))
    with torch.no_grad():
        model(torch.tensor(ids))

    def close(mine: torch.Tensor, expected: torch.Tensor) -> bool:
        return torch.allclose(mine, expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))

    expected_head = moments.pop("head")
    assert close(calibration.head_hessian(), expected_head)  # asked first, as an export asks for the head
    for name in sorted(moments, key=lambda n: int(n.split(".")[2])):  # layers in order, as an export asks
        assert close(calibration.hessian(name), moments[name])  # the head's pass left the layers' inputs alone
    with pytest.raises(RuntimeError, match="moved past layer 0"):
        calibration.hessian("model.layers.0.mlp.down_proj.weight")


def test_calibration_runs_no_layer_while_a_graph_is_traced(tmp_path: Path) -> None:
    """torch.compiler.is_exporting() is process-wide: a layer run beside a trace took the trace's
    custom ops and broke it (a KeyError from torch.fx in a SmolLM2 export at blocks of 64)."""
    import threading

    from llamatrt.exporter.onnx_export import TRACING

    folder = _tiny_folder(tmp_path, layers=1)
    calibration = Calibration(load_checkpoint(folder), [[5] * CALIBRATION_CONTEXT])
    with TRACING:
        asker = threading.Thread(target=calibration.head_hessian)
        asker.start()
        asker.join(timeout=0.5)
        assert asker.is_alive()  # waiting for the trace to end
    asker.join(timeout=30)
    assert not asker.is_alive() and calibration.head is not None


@pytest.mark.slow  # an export end to end
def test_an_export_with_calibration_text_records_gptq_blocks_and_validates(tmp_path: Path) -> None:
    folder = _tiny_folder(tmp_path, layers=3)  # layers 2.. are quantized as the export streams them
    text = tmp_path / "calibration.txt"
    text.write_text(_calibration_text(3 * CALIBRATION_CONTEXT + 17))
    options = ExportOptions(quantize="int4", head_quantize="int4", calibration=text, max_cache_len=32, prefill_chunk=8)
    manifest = export_artifact(folder, tmp_path / "q", options)
    tensors = dict(manifest.quantization["tensors"])
    assert (
        tensors.pop("model.embed_tokens.weight") == "gptq (4-bit, block 32)"
    )  # the tied head (8-bit: round-to-nearest)
    assert len(tensors) == 4 * 3 and set(tensors.values()) == {"gptq (4-bit, block 32)"}, tensors
    assert manifest.quantization["calibration"] == {"text": "calibration.txt", "tokens": 3 * CALIBRATION_CONTEXT}
    assert manifest.validation["max_abs_logits_error"] < 1e-4
