"""StaticLlama -> one ONNX graph variant at static shapes, opset 24.

The model is exported as it is (no patching); the lowerings we supply are for our two custom ops:
`llamatrt::write_kv` becomes ONNX `TensorScatter` (ONNX Runtime runs it in place, TensorRT maps it to
its KV-cache update layer) and, in fused-attention variants, `llamatrt::cached_attention` becomes
ONNX Runtime's GroupQueryAttention (exporter.ort_attention).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import threading
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llamatrt.base.artifact import names
from llamatrt.base.artifact.feeds import graph_feeds
from llamatrt.base.artifact.manifest import GraphSpec, contract_io
from llamatrt.base.artifact.variants import ONNXRUNTIME
from llamatrt.base.config import LlamaConfig
from llamatrt.exporter import ort_attention
from llamatrt.exporter.variants import VariantPlan
from llamatrt.models.kv_cache import empty_cache
from llamatrt.models.llama import StaticLlama
from llamatrt.models.rope import rope_tables

if TYPE_CHECKING:
    import onnx_ir as ir

OPSET = 24
KV_WRITE = "tensor_scatter"


def _write_kv_to_tensor_scatter(past, new, cache_position):  # type: ignore[no-untyped-def]
    """ONNX lowering of models.kv_cache.write_kv: row b writes from cache_position[b, 0]."""
    import onnxscript
    from onnxscript import opset18 as op

    op24 = onnxscript.values.Opset("", OPSET)
    starts = op.Squeeze(op.Slice(cache_position, [0], [1], [1]), [1])  # (batch,): TensorScatter's write_indices
    return op24.TensorScatter(past, new, starts, axis=2)


class GraphModule(nn.Module):
    """One graph's view of StaticLlama: its logits form and attention form are fixed when it is
    built, so nothing is flipped on the shared model between exports."""

    def __init__(self, model: StaticLlama, full_logits: bool, rope_capacity: int | None) -> None:
        super().__init__()
        self.model = model
        self.full_logits = full_logits
        # fused attention reads RoPE tables of every cache position; they become two initializers
        self.tables = None if rope_capacity is None else rope_tables(model.inv_freq, rope_capacity)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model(*inputs, full_logits=self.full_logits, rope_tables=self.tables)  # type: ignore[no-any-return]


def graph_spec(plan: VariantPlan, config: LlamaConfig, dtype: str, max_cache_len: int, full_logits: bool) -> GraphSpec:
    """The manifest entry of one variant: what it is, and its IO contract (DESIGN.md §1)."""
    inputs, outputs = contract_io(
        config,
        dtype,
        plan.batch,
        plan.seq,
        max_cache_len,
        full_logits and plan.role == "prefill",
        packs_tokens=plan.attention.name == ONNXRUNTIME.name,  # exporter.ort_packing makes it so
    )
    return GraphSpec(plan.name, plan.role, plan.path, inputs, outputs, plan.attention.name, dtype)


# Sizes the exporter traces an open dim at: not 0 or 1, which torch.export would specialize on.
TRACE_SIZES = {"batch": 2, "tokens": 3}


def example_inputs(spec: GraphSpec, model: StaticLlama) -> tuple[torch.Tensor, ...]:
    """Inputs of one call at the variant's shapes, in graph order, from the contract's feed builder."""
    batch, seq = spec.batch or TRACE_SIZES["batch"], spec.seq_len or TRACE_SIZES["tokens"]
    capacity = int(spec.input("attention_mask").shape[1])
    cache = empty_cache(model.config, batch, capacity, model.model.embed_tokens.weight.dtype)
    ids, positions = torch.zeros(batch, seq, dtype=torch.long), torch.arange(seq).expand(batch, seq).contiguous()
    feeds = graph_feeds(spec, ids, positions, 0, torch.ones(batch, capacity, dtype=torch.long), cache)
    return tuple(feeds[t.name] for t in spec.inputs)


def dynamic_shapes(spec: GraphSpec, max_batch: int) -> dict[str, tuple[dict[int, Any], ...]] | None:
    """torch.export's description of the variant's open dims ("batch", "tokens"), per input (all
    of them are GraphModule.forward's one varargs parameter)."""
    capacity = int(spec.input("attention_mask").shape[1])
    limits = {"batch": max_batch, "tokens": capacity}
    used = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    dims = {name: torch.export.Dim(name, min=1, max=limits[name]) for name in used}
    shapes = tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs)
    return {"inputs": shapes} if any(shapes) else None


def _custom_lowerings() -> dict[Any, Any]:
    return {
        torch.ops.llamatrt.write_kv.default: _write_kv_to_tensor_scatter,
        torch.ops.llamatrt.cached_attention.default: ort_attention.cached_attention_to_gqa,
    }


@functools.cache
def _lowerings(build: Any, opset_version: int) -> Any:
    """torch.onnx's registry of lowerings, torchlib's ATen functions and our two custom ops, built
    once a process: torch.onnx.export builds it anew on every call (about 1 s here, and an export
    traces four graphs; the test suite exports dozens of times), and no export changes it (it is
    only read: the dispatcher's lookups)."""
    from torch.onnx._internal.exporter import _registration

    registry = build(_registration.ONNXRegistry, opset_version)
    for op, lowering in _custom_lowerings().items():
        registry.register_op(op, lowering)
    return registry


@contextlib.contextmanager
def _shared_lowerings() -> Iterator[dict[Any, Any] | None]:
    """While torch.onnx.export runs, its registry comes from `_lowerings`; yields the custom
    translation table still to pass (None: the shared registry holds it), or the whole table where
    this torch has no such registry to share."""
    try:
        from torch.onnx._internal.exporter import _constants, _registration

        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, KeyError, AttributeError):
        yield _custom_lowerings()
        return

    def shared(cls: Any, opset_version: int = _constants.TORCHLIB_OPSET) -> Any:
        return _lowerings(build, opset_version)

    _registration.ONNXRegistry.from_torchlib = classmethod(shared)  # type: ignore[method-assign, assignment]
    try:
        yield None
    finally:
        _registration.ONNXRegistry.from_torchlib = original  # type: ignore[method-assign]


# Held while torch traces. torch.compiler.is_exporting() is process-wide, so a model run eagerly in
# another thread meanwhile (the calibration's layer runs, exporter.calibration, beside the stream)
# would take the traced paths (the custom ops) and break the trace's own state.
TRACING = threading.Lock()


def graph_to_onnx(model: StaticLlama, spec: GraphSpec, max_batch: int) -> ir.Model:
    """Export one variant (rows per call up to `max_batch` where they are open); returns the
    in-memory onnx_ir model (weights still in memory)."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    ort_attention.register_schema()
    # the model's own inputs: the packing ones are added to the traced graph (exporter.ort_packing)
    spec = replace(spec, inputs=tuple(t for t in spec.inputs if t.name not in names.PACKING_INPUTS))
    fused = spec.attention == ONNXRUNTIME.name
    module = GraphModule(model, spec.full_logits, int(spec.input("attention_mask").shape[1]) if fused else None)
    with (
        TRACING,
        _shared_lowerings() as lowerings,
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            example_inputs(spec, model),
            dynamic_shapes=dynamic_shapes(spec, max_batch),
            dynamo=True,
            opset_version=OPSET,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            custom_translation_table=lowerings,
            optimize=False,  # our own pass (onnx_optimize) runs next, and export validation checks it
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns a program
    return program.model
