"""ONNX Runtime-only fusions for the fused-attention graphs, after the optimizer has run.

ONNX Runtime's CPU session optimizer does not fuse a residual Add into the ONNX-standard
RMSNormalization that follows it, and on a decode step of a small model every node costs a few
microseconds of dispatch whatever it computes: on SmolLM2 int4 the graph had 1,192 nodes where
onnxruntime-genai's has 343. So the graph that only ONNX Runtime runs is written with its contrib
op `SkipSimplifiedLayerNormalization` (the sum and the norm in one kernel, both in fp32), as
onnxruntime-genai's model builder writes it; the portable graphs keep the standard ops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llamatrt.base.artifact.variants import MS_DOMAIN

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
