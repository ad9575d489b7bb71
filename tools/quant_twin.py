"""The exact-arithmetic twin of a quantized artifact's graph: the same nodes and weights with
MatMulNBits (and the portable graphs' fused DequantizeLinear -> MatMul) at accuracy_level 0
(fp32 activations). Export validation runs it against PyTorch on the
dequantized weights at the fp32 tolerance, so the graph's wiring is checked exactly; the int8
activations of accuracy_level 4 are kernel arithmetic, which `llamatrt diff` measures.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from llamatrt.base.artifact.manifest import Manifest
from llamatrt.base.artifact.reader import inside


def set_accuracy_level(model: Any, level: int) -> None:
    """Every MatMulNBits of an ONNX model (onnx.ModelProto) at `level`, in place."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = level


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
