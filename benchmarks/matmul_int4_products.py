"""MatMulInt4 beside MatMulNBits on one product shape, as a decode step meets it: a chain of L distinct
weights of that shape (L * their bytes well past the last-level cache, so each product streams its
weights from memory, or L = 1 to keep them cached), interleaved rounds, the median of each round's
time per product and of its ratio to MatMulNBits at accuracy level 4 (int8 activations). MatMulInt4
runs with 24-bit activations (a GGUF's blocks) and 16-bit ones (blocks re-quantized from floats).

Usage: .venv/bin/python benchmarks/matmul_int4_products.py [N=K] [THREADS] [L] [ROWS] [ROUNDS]
(square products, so that the chain feeds each its predecessor's output; `LIBRARY=path[:path...]` runs
other builds of the kernel beside the installed one)
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from llamatrt.base.custom_ops import DOMAIN, MATMUL_INT4, library_path

BLOCK = 32


def chain(count: int, size: int, kernel: str, rng: np.random.Generator) -> bytes:
    """`count` products of size x size, each on the previous one's output, Q4_0-shaped random blocks."""
    inits, nodes, previous = [], [], "a"
    for i in range(count):
        codes = rng.integers(0, 256, (size, size // BLOCK, BLOCK // 2), dtype=np.uint8)
        scales = (rng.random((size, size // BLOCK)) * 0.02).astype(np.float16).astype(np.float32)
        inits += [numpy_helper.from_array(codes, f"q{i}"), numpy_helper.from_array(scales, f"s{i}")]
        if kernel.startswith("MatMulInt4"):
            bits = int(kernel.split("-")[1])
            inputs = [previous, f"q{i}", f"s{i}"]
            node = helper.make_node(
                MATMUL_INT4, inputs, [f"y{i}"], domain=DOMAIN, K=size, N=size, block_size=BLOCK, activation_bits=bits
            )
        else:
            level = int(kernel[-1])
            node = helper.make_node(
                "MatMulNBits",
                [previous, f"q{i}", f"s{i}"],
                [f"y{i}"],
                domain="com.microsoft",
                K=size,
                N=size,
                bits=4,
                block_size=BLOCK,
                accuracy_level=level,
            )
        nodes.append(node)
        previous = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, size])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [None, size])],
        inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def session(model: bytes, library: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model, options)


def main(size: int, threads: int, count: int, rows: int, rounds: int) -> None:
    installed = library_path()
    if installed is None:
        sys.exit("error: llamatrt's MatMulInt4 is not built here; reinstall with gcc present (`pip install -e .`)")
    rng = np.random.default_rng(0)
    libraries = {"MatMulInt4": str(installed)}
    for other in filter(None, os.environ.get("LIBRARY", "").split(":")):
        libraries[f"MatMulInt4 ({os.path.basename(other)})"] = other
    sessions = {
        f"{name} {bits}-bit": session(chain(count, size, f"MatMulInt4-{bits}", rng), lib, threads)
        for name, lib in libraries.items()
        for bits in (24, 16)
    }
    for level in (4, 0):
        sessions[f"MatMulNBits level {level}"] = session(chain(count, size, f"L{level}", rng), str(installed), threads)
    feed = {"a": rng.standard_normal((rows, size)).astype(np.float32)}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    repeats = max(3, 400 // count)
    for _ in range(rounds):
        for name, s in sessions.items():
            s.run(None, feed)
            started = time.perf_counter()
            for _ in range(repeats):
                s.run(None, feed)
            times[name].append((time.perf_counter() - started) / repeats / count)
    megabytes = size * size * (BLOCK // 2 + 2) / BLOCK / 2**20  # codes and fp16 scales
    print(f"{count} products of {size}x{size} ({count * megabytes:.0f} MiB), {rows} row(s), {threads} thread(s):")
    reference = times["MatMulNBits level 4"]
    for name, values in times.items():
        ratios = sorted(t / r for t, r in zip(values, reference, strict=True))
        print(
            f"  {name:40s} {statistics.median(values) * 1e6:8.1f} us a product, "
            f"{statistics.median(ratios):.2f}x level 4's time ({ratios[0]:.2f}-{ratios[-1]:.2f})"
        )


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    defaults = [1536, 2, 40, 1, 9]
    main(*(args + defaults[len(args) :]))
