"""StaticLlama -> one ONNX graph (prefill or decode) at static shapes, opset 24.

The model is exported as it is (no patching); the only lowering we supply is the KV-cache write:
`llamatrt::write_kv` becomes ONNX `TensorScatter`, which ONNX Runtime can run in place and TensorRT
maps to its KV-cache update layer.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import TYPE_CHECKING

import torch

from llamatrt.exporter import ort_attention
from llamatrt.exporter.manifest import GraphSpec, TensorSpec, dtype_name
from llamatrt.models.kv_cache import cache_names, cache_shape, empty_cache
from llamatrt.models.llama import StaticLlama

if TYPE_CHECKING:
    import onnx_ir as ir

OPSET = 24
KV_WRITE = "tensor_scatter"


def _write_kv_to_tensor_scatter(past, new, cache_position):  # type: ignore[no-untyped-def]
    """ONNX lowering of models.kv_cache.write_kv: every row writes at cache_position[0]."""
    import onnxscript
    from onnxscript import opset18 as op

    op24 = onnxscript.values.Opset("", OPSET)
    start = op.Slice(cache_position, [0], [1])  # (1,)
    batch = op.Slice(op.Shape(past), [0], [1])
    return op24.TensorScatter(past, new, op.Expand(start, batch), axis=2)


def graph_spec(name: str, model: StaticLlama, batch: int, seq: int, max_cache_len: int) -> GraphSpec:
    """The IO contract of DESIGN.md §1 for one graph."""
    config = model.config
    dtype = dtype_name(model.model.embed_tokens.weight.dtype)
    kv = cache_shape(config, batch, max_cache_len)
    logits = (batch, seq, config.vocab_size) if model.full_logits else (batch, config.vocab_size)
    inputs = (
        TensorSpec("input_ids", (batch, seq), "int64"),
        TensorSpec("position_ids", (batch, seq), "int64"),
        TensorSpec("cache_position", (seq,), "int64"),
        TensorSpec("attention_mask", (batch, max_cache_len), "int64"),
        *(TensorSpec(n, kv, dtype) for n in cache_names(config.num_layers, "past")),
    )
    outputs = (
        TensorSpec("logits", logits, "float32"),
        *(TensorSpec(n, kv, dtype) for n in cache_names(config.num_layers, "present")),
    )
    return GraphSpec(name, f"{name}.onnx", inputs, outputs)


def example_inputs(spec: GraphSpec, model: StaticLlama) -> tuple[torch.Tensor, ...]:
    batch, seq = spec.input("input_ids").shape
    max_cache_len = spec.input("attention_mask").shape[1]
    dtype = model.model.embed_tokens.weight.dtype
    return (
        torch.zeros(batch, seq, dtype=torch.long),
        torch.arange(seq).expand(batch, seq).contiguous(),
        torch.arange(seq),
        torch.ones(batch, max_cache_len, dtype=torch.long),
        *empty_cache(model.config, batch, max_cache_len, dtype),
    )


def graph_to_onnx(model: StaticLlama, spec: GraphSpec, fused_attention: bool = False) -> ir.Model:
    """Export one graph; returns the in-memory onnx_ir model (weights still in memory).

    fused_attention: attention as ONNX Runtime's GroupQueryAttention (exporter.ort_attention)
    instead of portable ops; the IO contract is the same."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    ort_attention.register_schema()
    model.fuse_attention(spec.input("attention_mask").shape[1] if fused_attention else None)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model,
                example_inputs(spec, model),
                dynamo=True,
                opset_version=OPSET,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                custom_translation_table={
                    torch.ops.llamatrt.write_kv.default: _write_kv_to_tensor_scatter,
                    torch.ops.llamatrt.cached_attention.default: ort_attention.cached_attention_to_gqa,
                },
                optimize=False,  # our own pass (onnx_optimize) runs next, measured and checked
                verbose=False,
            )
        finally:
            model.fuse_attention(None)
    assert program is not None  # dynamo=True always returns a program
    return program.model
