"""Weight-only quantization of a portable graph: MatMul(x, W^T) -> MatMul(x, DequantizeLinear(q, s)).

The standard-op form TensorRT builds as a weight-only quantized GEMM (and ONNX Runtime fuses back
into MatMulNBits). TensorRT's int4 weight-only form is symmetric (no zero point) with blocks of 64
or 128 along the input dimension, so only a plan whose every block is of that form is written this
way: the very codes and scales of the MatMulNBits graph (code - 8 as signed int4), transposed to
the [K, N] layout of the MatMul's B input. The same weights in both graphs, so ONNX Runtime's graph
and the portable one compute the same logits. The embedding lookup reads a float table of the
dequantized rows: TensorRT gathers no int4 tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from llamatrt.base.artifact.precision import WEIGHT_FORMATS, weight_format
from llamatrt.exporter.quant_weights import DEFAULT_ZERO, STORED, QuantizedWeight
from llamatrt.exporter.quantize import Initializers, rewrite_weight_uses

if TYPE_CHECKING:
    import onnx_ir as ir

TENSORRT_INT4_BLOCKS = WEIGHT_FORMATS["int4"].tensorrt_blocks


def tensorrt_can_take(weights: Mapping[str, QuantizedWeight]) -> str | None:
    """None when every weight is in a weight-only form TensorRT takes (symmetric blocks of a size
    its format allows: base.artifact.precision.WEIGHT_FORMATS), else why not (one phrase)."""
    for name, w in weights.items():
        blocks = weight_format(w.bits).tensorrt_blocks
        if not blocks or w.zero != DEFAULT_ZERO[w.bits] or w.offsets is not None:
            return f"{name} is {w.origin} ({w.bits}-bit{', asymmetric' if w.offsets is not None else ''})"
        if w.block not in blocks or w.k % w.block:
            return f"{name} has blocks of {w.block} over {w.k} inputs"
    return None


def dequantize_linear_graph(
    model: ir.Model,
    weights: Mapping[str, QuantizedWeight],
    floats: Mapping[str, np.ndarray],
    after_read: Callable[[], object] = lambda: None,
) -> list[str]:
    """Rewrite `model` in place (see the module docstring); returns the parameters it rewrote
    (`after_read`: as quantize.rewrite_weight_uses)."""
    import onnx_ir as ir

    def matmul(node: ir.Node, name: str, inits: Initializers) -> None:
        w = weights[name]
        codes = inits.get_tensor(f"{name}.int4", ir.Tensor(STORED[".int4"](w), dtype=ir.DataType.INT4))
        scales = inits.get(f"{name}.scales.kn", STORED[".scales.kn"](w))
        dq = ir.Node(
            "",
            "DequantizeLinear",
            [codes, scales],
            [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", w.block)],
            num_outputs=1,
        )
        model.graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])

    def lookup(node: ir.Node, name: str, inits: Initializers) -> bool:
        node.replace_input_with(0, inits.get(f"{name}.dequantized", STORED[".dequantized"](weights[name])))
        return True

    return rewrite_weight_uses(model, weights, floats, matmul, lookup, after_read)
