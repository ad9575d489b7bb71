"""Time one graph call (a decode step) of several ONNX files in ONNX Runtime CPU, interleaved.

Usage: .venv/bin/python benchmarks/graph_step.py [--threads N] [--context N] [--matmuls] GRAPH.onnx ...

Each round times every graph in turn (20 calls after 3 warm-up calls), so host drift hits all
alike; prints the median and min of 6 rounds. Inputs are bound once with IO binding, present
aliased to past (as the runtime does), the cache holding `--context` written slots. `--matmuls`
adds a graph made of only the first graph's weight MatMuls at the same shapes: what the step would
cost if everything but the weight reads were free.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def session(model: str | bytes, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def bound_step(sess: Any, context: int) -> Any:
    """IO binding of a decode step at `context`, each present bound to its past buffer."""
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.full(i.shape, 5, np.int64)
        elif i.name in ("position_ids", "cache_position"):  # the call writes slots context .. context + S - 1
            feeds[i.name] = np.broadcast_to(np.arange(context, context + i.shape[-1]), i.shape).astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones(i.shape, np.int64)
        else:
            feeds[i.name] = np.zeros(i.shape, np.float32 if "float" in i.type else np.int64)
    binding = sess.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    for out in sess.get_outputs():
        past = feeds.get(out.name.replace("present.", "past_key_values.", 1))
        if past is not None:
            binding.bind_output(out.name, "cpu", 0, past.dtype, past.shape, past.ctypes.data)
        else:
            binding.bind_output(out.name)
    binding.keep_alive = feeds  # the bound arrays must outlive the binding
    return binding


def matmul_only(graph: Path) -> tuple[bytes, dict[str, np.ndarray]]:
    """A graph of the weight MatMuls of `graph` (random weights, same shapes), all fed one row."""
    proto = onnx.load(str(graph), load_external_data=False)
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    for node in proto.graph.node:  # the tied head reads the embedding through a Transpose
        if node.op_type == "Transpose" and node.input[0] in shapes and len(shapes[node.input[0]]) == 2:
            shapes[node.output[0]] = shapes[node.input[0]][::-1]
    weights = [shapes[n.input[1]] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in shapes]
    nodes, initializers, outputs, inputs = [], [], [], {}
    for k, (rows, cols) in enumerate(weights):
        initializers.append(numpy_helper.from_array((np.random.randn(rows, cols) * 0.01).astype(np.float32), f"w{k}"))
        inputs.setdefault(rows, np.random.randn(1, rows).astype(np.float32))
        nodes.append(helper.make_node("MatMul", [f"x{rows}", f"w{k}"], [f"y{k}"]))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, [1, cols]))
    feeds = [helper.make_tensor_value_info(f"x{rows}", TensorProto.FLOAT, [1, rows]) for rows in inputs]
    model = helper.make_model(helper.make_graph(nodes, "matmuls", feeds, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    model.ir_version = 8
    return model.SerializeToString(), {f"x{rows}": x for rows, x in inputs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--matmuls", action="store_true")
    args = parser.parse_args()
    steps = {}
    for graph in args.graphs:
        sess = session(str(graph), args.threads)
        binding = bound_step(sess, args.context)
        steps[str(graph)] = lambda s=sess, b=binding: s.run_with_iobinding(b)
    if args.matmuls:
        model, feeds = matmul_only(args.graphs[0])
        sess = session(model, args.threads)
        steps[f"{args.graphs[0].name}: weight MatMuls only"] = lambda s=sess, f=feeds: s.run(None, f)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(6):
        for name, step in steps.items():
            for _ in range(3):
                step()
            start = time.perf_counter()
            for _ in range(20):
                step()
            times[name].append((time.perf_counter() - start) / 20 * 1000)
    for name, values in times.items():
        print(f"{name:60s} median {statistics.median(values):6.2f} ms  min {min(values):6.2f} ms")


if __name__ == "__main__":
    main()
