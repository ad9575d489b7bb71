"""Graph clean-up after export: constant folding, shape cleanup, dead-code removal.

A raw dynamo export is mostly shape arithmetic on static shapes (README: nodes before and after);
onnxscript's optimizer folds it, so ONNX Runtime and TensorRT have less to fold at every load.
Export-time validation runs on the optimized graph, so the pass is checked to compute the same
logits as PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_ir as ir


def optimize_graph(model: ir.Model) -> ir.Model:
    """Fold constants and static shapes in place, keeping weights as they are.

    Large folds are refused (output_size_limit) so a Transpose of a weight is not materialized as
    a second copy on disk: the tied embedding must stay one tensor shared by Gather and MatMul.
    """
    import onnxscript.optimizer

    onnxscript.optimizer.optimize(model, num_iterations=2, input_size_limit=1024, output_size_limit=1 << 16)
    return strip_export_metadata(model)


def strip_export_metadata(model: ir.Model) -> ir.Model:
    """Drop torch's per-node stack traces and FX dumps (90% of the .onnx bytes, and they embed
    local paths); keep `namespace`, which maps a node back to the module that made it."""
    for node in model.graph:
        for key in [k for k in node.metadata_props if k != "namespace"]:
            del node.metadata_props[key]
    return model
