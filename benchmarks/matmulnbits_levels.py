"""One MatMulNBits node timed alone at each accuracy level, for 4- and 8-bit weights of SmolLM2's
shapes (random codes: speed depends on shapes, not values), with 1, 2 and 4 activation rows: two rows
at level 4 are what an 8-bit product with fp32 activations costs (exporter.quantize `_two_pass`).
Usage: python benchmarks/matmulnbits_levels.py

Prints microseconds per call (median of 300 calls after 20 warm-up ones, 2 threads; 20 calls for
the slow 8-bit fp32 path)."""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = {
    "q|k|v 576->960": (576, 960),
    "o 576->576": (576, 576),
    "gate|up 576->3072": (576, 3072),
    "down 1536->576": (1536, 576),
    "head 576->49152": (576, 49152),
}
ROWS = (1, 2, 4)


def session(k: int, n: int, bits: int, level: int, rows: int, block: int = 32) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 255, (n, k // block, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * k // block) * 0.01).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits",
        ["x", "q", "s"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=level,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
        initializer=[numpy_helper.from_array(packed, "q"), numpy_helper.from_array(scales, "s")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def microseconds(k: int, n: int, bits: int, level: int, rows: int) -> float:
    s = session(k, n, bits, level, rows)
    x = np.random.default_rng(1).random((rows, k), dtype=np.float32)
    slow = bits == 8 and level < 4  # the 8-bit fp32 path dequantizes the whole matrix per call
    calls = 20 if slow and n > 10_000 else 300
    for _ in range(2 if calls == 20 else 20):
        s.run(None, {"x": x})
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        s.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    print(f"onnxruntime {ort.__version__}; microseconds per call, rows = {', '.join(map(str, ROWS))}")
    for label, (k, n) in SHAPES.items():
        for bits in (4, 8):
            for level in (0, 1, 2, 3, 4):
                figures = " / ".join(f"{microseconds(k, n, bits, level, rows):8.1f}" for rows in ROWS)
                print(f"{label:<20} {bits}-bit level {level}: {figures}")


if __name__ == "__main__":
    main()
