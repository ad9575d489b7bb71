"""An 8-bit weight with fp32 activations runs MatMulNBits' int8 kernel in two passes (exporter.quantize
`_two_pass`): the input on the kernel's own grid, then its remainder. The product must be exact to
well within one pass's error, on inputs with outlier channels and all-zero blocks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from llamatrt.exporter.quant_weights import rtn_quantize
from llamatrt.exporter.quantize import quantize_graph

K, N = 96, 80


def _matmul_model(weight: np.ndarray) -> ir.Model:
    """x [1, 2, K] @ W^T, with W^T a pre-transposed initializer (as the exporter writes it)."""
    x = ir.Value(name="x", shape=ir.Shape([1, 2, K]), type=ir.TensorType(ir.DataType.FLOAT))
    w_t = ir.Value(name="w_t", const_value=ir.tensor(np.ascontiguousarray(weight.T), name="w_t"))
    node = ir.Node("", "MatMul", [x, w_t], num_outputs=1)
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w_t], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _relative_error(level: int, floats: np.ndarray, x: np.ndarray) -> float:
    weight = rtn_quantize(floats, 8, 32)
    model = _matmul_model(floats)
    quantize_graph(model, {"w": weight}, {"w": floats}, accuracy_level=level)
    ops = [(n.op_type, n.attributes.get_int("accuracy_level", -1)) for n in model.graph if n.domain]
    assert ops == [("MatMulNBits", 4)]  # one int8-kernel call either way; level 0 feeds it two rows
    exact = x.astype(np.float64) @ weight.dequantize().astype(np.float64).T
    return float(np.abs(_run(model, x) - exact).max() / np.abs(exact).max())


def test_an_8_bit_product_at_level_0_is_two_int8_passes_exact_far_beyond_one() -> None:
    rng = np.random.default_rng(0)
    floats = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((1, 2, K)).astype(np.float32)
    x[0, 0, 5] = 60.0  # an outlier channel
    x[0, 1, 32:64] = 0.0  # an all-zero block
    one_pass, two_passes = _relative_error(4, floats, x), _relative_error(0, floats, x)
    # the remainder's rounding step is at most 1/254 of the input's (|r| <= step / 2, in 127 steps)
    assert two_passes <= one_pass / 100, (one_pass, two_passes)
    assert two_passes < 1e-4
