"""One MatMulNBits node timed alone at each accuracy level, for 4- and 8-bit weights of SmolLM2's
shapes (random codes: speed depends on shapes, not values). Usage: python benchmarks/matmulnbits_levels.py

Prints microseconds per call (median of 300 calls after 20 warm-up ones, batch 1, 2 threads)."""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"576->1536": (576, 1536), "down_proj 1536->576": (1536, 576), "head 576->49152": (576, 49152)}


def session(k: int, n: int, bits: int, level: int, block: int = 32) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 255, (n, k // block, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * k // block) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)  # fmt: skip
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              initializer=[numpy_helper.from_array(packed, "q"), numpy_helper.from_array(scales, "s")])  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    print(f"onnxruntime {ort.__version__}")
    for label, (k, n) in SHAPES.items():
        for bits in (4, 8):
            for level in (0, 1, 2, 3, 4):
                s = session(k, n, bits, level)
                x = np.random.default_rng(1).random((1, k), dtype=np.float32)
                calls = 300 if n < 10_000 or level == 4 or bits == 4 else 20
                for _ in range(20 if calls == 300 else 2):
                    s.run(None, {"x": x})
                times = []
                for _ in range(calls):
                    start = time.perf_counter()
                    s.run(None, {"x": x})
                    times.append(time.perf_counter() - start)
                print(f"{label:<22} {bits}-bit level {level}: {1e6 * statistics.median(times):9.1f} us")


if __name__ == "__main__":
    main()
