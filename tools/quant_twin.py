"""The exact-arithmetic twin of a quantized artifact's graph: the same nodes and weights with
MatMulNBits (and the portable graphs' fused DequantizeLinear -> MatMul) at accuracy_level 0
(fp32 activations). Export validation runs it against PyTorch on the
dequantized weights at the fp32 tolerance, so the graph's wiring is checked exactly; the int8
activations of accuracy_level 4 are kernel arithmetic, which `llamatrt diff` measures.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from llamatrt.base.artifact.manifest import Manifest
from llamatrt.base.artifact.reader import inside
from llamatrt.base.artifact.variants import MS_DOMAIN
from llamatrt.base.custom_ops import DOMAIN, MATMUL_INT4


def set_accuracy_level(model: Any, level: int) -> None:
    """Every MatMulNBits of an ONNX model (onnx.ModelProto) at `level`, in place."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = level


def as_matmulnbits(model: Any, inits: Mapping[str, np.ndarray]) -> int:
    """Every llamatrt MatMulInt4 of an ONNX model rewritten, in place, as the exporter writes the same
    product for MatMulNBits (the same codes and scales; a Q4_1 offset as MatMulNBits' symmetric kernel
    plus the block sums of x times m + 8d), so that `diff --layerwise` can run it at level 4 beside
    level 0. Returns how many it rewrote."""
    from onnx import helper, numpy_helper

    rewritten, nodes = 0, []
    for node in model.graph.node:
        if node.op_type != MATMUL_INT4 or node.domain != DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
        x, packed, scales, out = node.input[0], node.input[1], node.input[2], node.output[0]
        offsets = node.input[3] if len(node.input) > 3 and node.input[3] else None
        product = out if offsets is None else f"{out}.symmetric"
        nodes.append(
            helper.make_node(
                "MatMulNBits", [x, packed, scales], [product], domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=block
            )
        )
        if offsets is not None:
            blocks = -(-k // block)
            shifted = inits[offsets] + 8 * inits[scales].reshape(n, blocks).T  # [blocks, N]
            names = (f"{out}.shifted", f"{out}.blocks_shape", f"{out}.last_axis")
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(shifted.astype(np.float32), names[0]),
                    numpy_helper.from_array(np.array([0, 0, blocks, block], dtype=np.int64), names[1]),
                    numpy_helper.from_array(np.array([-1], dtype=np.int64), names[2]),
                ]
            )
            nodes += [
                helper.make_node("Reshape", [x, names[1]], [f"{out}.blocked"]),
                helper.make_node("ReduceSum", [f"{out}.blocked", names[2]], [f"{out}.sums"], keepdims=0),
                helper.make_node("MatMul", [f"{out}.sums", names[0]], [f"{out}.offset"]),
                helper.make_node("Add", [product, f"{out}.offset"], [out]),
            ]
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return rewritten


def exact_twin(folder: Path, manifest: Manifest, out: Path) -> Manifest:
    """Write the twin graphs into `out` beside a link (or copy) of the weights; returns its manifest."""
    import onnx

    weights = inside(folder, manifest.weights_file, "weights file")
    try:
        os.link(weights, out / manifest.weights_file)
    except OSError:  # another filesystem: a copy (quantized weights are small)
        shutil.copyfile(weights, out / manifest.weights_file)
    for name, graph in manifest.graphs.items():
        model = onnx.load(str(inside(folder, graph.path, f"graph {name!r} path")), load_external_data=False)
        set_accuracy_level(model, 0)
        onnx.save(model, str(out / graph.path))
    # a portable graph's DequantizeLinear -> MatMul runs at the manifest's level (OrtBackend)
    return replace(manifest, quantization={**manifest.quantization, "accuracy_level": 0})
