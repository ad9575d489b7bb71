"""Would two int8 passes (exporter.quantize `_two_pass`) pay on the 4-bit projections too? A chain of
30 SmolLM2-shaped layers of MatMulNBits products alone (q|k|v, o, gate|up, down; random 4-bit codes,
tanh and an RMS normalization between them so values stay in range), timed three ways: fp32
activations (level 0), one int8 pass (level 4), and two int8 passes, whose split of each input costs
ten small nodes. Prints ms per forward (median of 200 after 10 warm-ups, 2 threads) and the last
layer's relative error against level 0.

Usage: python benchmarks/two_pass_layers.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BLOCK, HIDDEN, FFN, LAYERS = 32, 576, 1536, 30


class Chain:
    def __init__(self, level: int, two_pass: bool) -> None:
        self.level, self.two_pass = level, two_pass
        self.rng = np.random.default_rng(0)
        self.nodes: list = []
        self.inits: list = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, *inputs: str, **attributes: object) -> str:
        out = self.name(op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name("n"), **attributes))
        return out

    def split(self, x: str, k: int) -> str:
        """[xq ; x - xq]: x rounded per block to the int8 kernel's own grid, and the remainder."""
        if not self.two_pass:
            return x
        blocked = self.op("Reshape", x, self.const(np.array([-1, BLOCK], np.int64)))
        peak = self.op("ReduceMax", self.op("Abs", blocked), self.const(np.array([-1], np.int64)), keepdims=1)
        step = self.op(
            "Max",
            self.op("Mul", peak, self.const(np.array(1 / 127, np.float32))),
            self.const(np.array(1e-30, np.float32)),
        )
        grid = self.op("Mul", self.op("Round", self.op("Div", blocked, step)), step)
        xq = self.op("Reshape", grid, self.const(np.array([-1, k], np.int64)))
        return self.op("Concat", xq, self.op("Sub", x, xq), axis=0)

    def product(self, x: str, k: int, n: int) -> str:
        packed = self.rng.integers(0, 255, (n, k // BLOCK, BLOCK // 2), dtype=np.uint8)
        scales = (self.rng.random(n * k // BLOCK) * 2 / (np.sqrt(k) * 4.6)).astype(np.float32)
        out = self.name("mm")
        self.nodes.append(
            helper.make_node(
                "MatMulNBits",
                [x, self.const(packed), self.const(scales)],
                [out],
                name=self.name("n"),
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=BLOCK,
                accuracy_level=self.level,
            )
        )
        if self.two_pass:
            rows = self.op("Reshape", out, self.const(np.array([2, -1, n], np.int64)))
            out = self.op("ReduceSum", rows, self.const(np.array([0], np.int64)), keepdims=0)
        return out

    def session(self) -> tuple[ort.InferenceSession, int]:
        h, outputs = "x", []
        for _ in range(LAYERS):
            a = self.split(h, HIDDEN)
            q = self.op("Tanh", self.product(a, HIDDEN, HIDDEN + 2 * 192))
            o = self.op("Tanh", self.product(self.split(q, HIDDEN + 2 * 192), HIDDEN + 2 * 192, HIDDEN))
            gate_up = self.product(self.split(o, HIDDEN), HIDDEN, 2 * FFN)
            gate, up = self.name("gate"), self.name("up")
            self.nodes.append(helper.make_node("Split", [gate_up], [gate, up], axis=-1, num_outputs=2))
            act = self.op("Mul", self.op("Tanh", gate), self.op("Tanh", up))
            h = self.product(self.split(act, FFN), FFN, HIDDEN)
            rms = self.op("Sqrt", self.op("ReduceMean", self.op("Mul", h, h), self.const(np.array([-1], np.int64))))
            h = self.op("Div", h, rms)
            outputs.append(h)
        graph = helper.make_graph(
            self.nodes,
            "chain",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])],
            [helper.make_tensor_value_info(outputs[-1], TensorProto.FLOAT, None)],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        )
        model.ir_version = 10
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), len(
            self.nodes
        )


def main() -> None:
    x = np.random.default_rng(1).standard_normal((1, HIDDEN)).astype(np.float32)
    x[0, 7] = 40.0  # an outlier channel
    ways = {
        "fp32 activations (level 0)": (0, False),
        "one int8 pass (level 4)": (4, False),
        "two int8 passes (level 4)": (4, True),
    }
    sessions = {label: Chain(*way).session() for label, way in ways.items()}
    reference = next(iter(sessions.values()))[0].run(None, {"x": x})[0]
    print(f"onnxruntime {ort.__version__}; {LAYERS} layers of q|k|v, o, gate|up and down products")
    for label, (session, nodes) in sessions.items():
        for _ in range(10):
            out = session.run(None, {"x": x})[0]
        times = []
        for _ in range(200):
            start = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - start)
        error = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        print(f"{label:<28} {nodes:5d} nodes  {1e3 * statistics.median(times):6.2f} ms  error {error:.1e}")


if __name__ == "__main__":
    main()
