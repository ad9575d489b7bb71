"""ONNX Runtime-only fusions for the fused-attention graphs, after the optimizer has run.

ONNX Runtime's CPU session optimizer does not fuse a residual Add into the ONNX-standard
RMSNormalization that follows it, and on a decode step of a small model every node costs a few
microseconds of dispatch whatever it computes: on SmolLM2 int4 the graph had 1,192 nodes where
onnxruntime-genai's has 343. So the graph that only ONNX Runtime runs is written with its contrib
op `SkipSimplifiedLayerNormalization` (the sum and the norm in one kernel, both in fp32), as
onnxruntime-genai's model builder writes it; the portable graphs keep the standard ops. For the
same reason a 4-bit MLP's gate/up product on llamatrt's MatMulInt4 applies SwiGLU itself (its
`swiglu` attribute) instead of the Slice, Slice, Sigmoid, Mul, Mul that follow it in the trace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llamatrt.base.artifact.variants import MS_DOMAIN
from llamatrt.base.custom_ops import DOMAIN, MATMUL_INT4

if TYPE_CHECKING:
    import onnx_ir as ir


def fuse_skip_rms_norm(model: ir.Model) -> int:
    """Add(a, b) -> RMSNormalization(sum, gamma) becomes one SkipSimplifiedLayerNormalization whose
    fourth output is the sum (the residual stream read by the next layer). Returns the count fused.

    The tensors keep their names (the norm's output, the sum), so `diff --layerwise` still matches
    them with the portable reference graph."""
    import onnx_ir as ir

    graph, fused = model.graph, 0
    for norm in list(graph):
        if norm.op_type != "RMSNormalization" or norm.domain != "" or norm.inputs[0] is None:
            continue
        add = norm.inputs[0].producer()
        if (
            add is None
            or add.op_type != "Add"
            or add.domain != ""
            or len(norm.inputs) < 2
            or norm.attributes.get_int("axis", -1) != -1
            or not _same_shape_residuals(add)
        ):
            continue  # a broadcasting Add, or a norm over more than the last axis
        epsilon = norm.attributes.get_float("epsilon", 1e-5)
        skip = ir.Node(
            MS_DOMAIN,
            "SkipSimplifiedLayerNormalization",
            [add.inputs[0], add.inputs[1], norm.inputs[1]],
            [ir.AttrFloat32("epsilon", epsilon)],
            num_outputs=4,
        )
        graph.insert_before(add, skip)
        out, _, _, total = skip.outputs
        out_name, total_name = norm.outputs[0].name, add.outputs[0].name
        ir.convenience.replace_all_uses_with(norm.outputs[0], out, replace_graph_outputs=True)
        ir.convenience.replace_all_uses_with(add.outputs[0], total, replace_graph_outputs=True)
        graph.remove([norm, add], safe=True)
        out.name, total.name = out_name, total_name
        out.shape, out.type = norm.outputs[0].shape, norm.outputs[0].type
        total.shape, total.type = add.outputs[0].shape, add.outputs[0].type
        skip.outputs[1].name, skip.outputs[2].name = "", ""
        fused += 1
    if fused:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return fused


def _same_shape_residuals(add: ir.Node) -> bool:
    """Both operands computed (no bias or constant) and of one shape where the shapes are known
    (values made by later rewrites carry none): the op adds two (batch, seq, hidden) tensors."""
    a, b = add.inputs
    if a is None or b is None or a.const_value is not None or b.const_value is not None:
        return False
    out = add.outputs[0].shape
    return all(v.shape is None or out is None or v.shape == out for v in (a, b)) and (out is None or len(out) == 3)


def fuse_swiglu(model: ir.Model) -> int:
    """MatMulInt4 -> Slice [:N/2], Slice [N/2:] -> silu(first) * second becomes one MatMulInt4 with
    swiglu = 1 (runtime/kernels/matmul_int4.c). Returns the count fused.

    The fused output keeps the final Mul's name, so `diff --layerwise` still matches it with the
    portable reference graph (the product's halves, which no longer exist, are simply not compared)."""
    import onnx_ir as ir

    fused = 0
    for node in list(model.graph):
        if node.op_type != MATMUL_INT4 or node.domain != DOMAIN or "swiglu" in node.attributes:
            continue
        n = node.attributes.get_int("N", 0)
        x = node.inputs[0]
        # the graphs' activations are (batch, tokens, features); values made by rewrites carry no shape
        rank = 3 if x is None or x.shape is None else len(x.shape)
        halves = _swiglu_halves(node.outputs[0], n, rank)
        if n % 16 != 0 or halves is None:  # the kernel's half-tiles of 8 gate and 8 up rows
            continue
        gate, up = halves
        sigmoid = _only_use(gate, "Sigmoid", also=1)
        silu = None if sigmoid is None else _only_use(sigmoid.outputs[0], "Mul")
        if sigmoid is None or silu is None or set(silu.inputs) != {gate, sigmoid.outputs[0]}:
            continue
        out = _only_use(silu.outputs[0], "Mul")
        if out is None or set(out.inputs) != {silu.outputs[0], up} or len(up.uses()) != 1:
            continue
        node.attributes["swiglu"] = ir.AttrInt64("swiglu", 1)
        result = out.outputs[0]
        product = node.outputs[0]
        dead = [gate.producer(), up.producer(), sigmoid, silu, out]
        ir.convenience.replace_all_uses_with(result, product, replace_graph_outputs=True)
        model.graph.remove([d for d in dead if d is not None], safe=True)
        product.name, product.shape, product.type = result.name, result.shape, result.type
        fused += 1
    return fused


def _swiglu_halves(product: ir.Value, n: int, rank: int) -> tuple[ir.Value, ir.Value] | None:
    """The (first half, second half) Slices of a product's last axis (-1, or rank - 1) that are its
    only uses."""
    halves: dict[tuple[int, int], ir.Value] = {}
    for use in product.uses():
        slice_ = use.node
        if slice_.op_type != "Slice" or slice_.domain != "" or use.idx != 0:
            return None
        bounds = [_ints(v) for v in slice_.inputs[1:]]
        if len(bounds) < 3 or any(b is None or len(b) != 1 for b in bounds):
            return None
        (start,), (end,), (axis,), *steps = bounds  # type: ignore[misc]
        if axis not in (-1, rank - 1) or any(s != [1] for s in steps):
            return None
        halves[(start, min(end, n))] = slice_.outputs[0]
    if set(halves) != {(0, n // 2), (n // 2, n)}:
        return None
    return halves[(0, n // 2)], halves[(n // 2, n)]


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


def _only_use(value: ir.Value, op_type: str, also: int = 0) -> ir.Node | None:
    """The node of type `op_type` reading `value`, where `value` has exactly 1 + `also` uses."""
    uses = value.uses()
    found = [u.node for u in uses if u.node.op_type == op_type and u.node.domain == ""]
    return found[0] if len(uses) == 1 + also and len(found) == 1 else None
