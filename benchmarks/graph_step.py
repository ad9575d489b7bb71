"""Time one call of several artifacts' graphs in ONNX Runtime CPU, interleaved.

Usage: .venv/bin/python benchmarks/graph_step.py [--threads N] [--context N] [--matmuls] ARTIFACT/GRAPH.onnx ...

Each GRAPH.onnx is a graph of an artifact (its manifest says what the graph is). Each round times
every graph in turn (20 calls after 3 warm-up calls), so host drift hits all alike; prints the
median and min of 6 rounds. Calls go through the runtime's OrtBackend with the contract's feed
builder (IO binding, present aliased to past, as `generate` runs them), writing at slot `--context`.
`--matmuls` adds a graph made of only the first graph's weight MatMuls at the same shapes: what the
step would cost if everything but the weight reads were free.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper


def session(model: str | bytes, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def contract_step(path: Path, threads: int, context: int) -> Callable[[], object]:
    """One call of the artifact graph at `path`, fed by the contract's builder, as the runtime runs it."""
    from llamatrt.base.artifact.feeds import fixed_prompt, graph_feeds
    from llamatrt.base.artifact.reader import read_manifest
    from llamatrt.runtime.ort_backend import OrtBackend

    manifest = read_manifest(path.parent, verify=False)
    graph = next((g for g in manifest.graphs.values() if g.path == path.name), None)
    if graph is None:
        raise SystemExit(f"{path} is not a graph of the artifact in {path.parent}")
    backend = OrtBackend(path.parent, manifest, threads=threads, attention=graph.attention, check_feeds=False)
    batch, seq = graph.batch or manifest.batch_size, graph.seq_len or 1  # a graph with open dims: a decode step
    graph = backend.graph("decode" if seq == 1 and graph.role != "prefill" else "prefill", batch, seq)
    ids = fixed_prompt(batch, seq, manifest.config.vocab_size)
    positions = torch.arange(context, context + seq).expand(batch, -1).contiguous()
    mask = torch.ones(batch, manifest.max_cache_len, dtype=torch.long)
    cache = [t[:batch] for t in backend.allocate_cache()]
    feeds = graph_feeds(graph, ids, positions, context, mask, cache)
    return lambda: backend.run(graph.name, feeds)


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
    model = helper.make_model(
        helper.make_graph(nodes, "matmuls", feeds, outputs, initializers), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return model.SerializeToString(), {f"x{rows}": x for rows, x in inputs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--matmuls", action="store_true")
    args = parser.parse_args()
    steps = {str(graph): contract_step(graph, args.threads, args.context) for graph in args.graphs}
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
