"""The exact-arithmetic twin of a quantized artifact's graph: the same nodes and weights with
MatMulNBits (and the portable graphs' fused DequantizeLinear -> MatMul) at accuracy_level 0
(fp32 activations) and MatMulInt4 at 24-bit activations. Export validation runs it against PyTorch
on the dequantized weights at the fp32 tolerance, so the graph's wiring is checked exactly; the int8
activations of accuracy_level 4 and MatMulInt4's 16-bit ones are kernel arithmetic, which
`llamatrt diff` measures (and tests/runtime/test_matmul_int4.py bounds).
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
from llamatrt.base.custom_ops import DOMAIN, EXACT_ACTIVATION_BITS, MATMUL_INT4


def set_accuracy_level(model: Any, level: int) -> None:
    """Every MatMulNBits of an ONNX model (onnx.ModelProto) at `level`, in place."""
    _set_int_attribute(model, "MatMulNBits", None, "accuracy_level", level)


def set_exact_activations(model: Any) -> None:
    """Every llamatrt MatMulInt4 of an ONNX model (onnx.ModelProto) at 24-bit activations, in place."""
    _set_int_attribute(model, MATMUL_INT4, DOMAIN, "activation_bits", EXACT_ACTIVATION_BITS)


def _set_int_attribute(model: Any, op_type: str, domain: str | None, name: str, value: int) -> None:
    """`name` = `value` on every node of `op_type` (of `domain`, where given) that has the attribute."""
    for node in model.graph.node:
        if node.op_type == op_type and domain in (None, node.domain):
            for attribute in node.attribute:
                if attribute.name == name:
                    attribute.i = value


def as_matmulnbits(model: Any, inits: Mapping[str, np.ndarray]) -> int:
    """Every llamatrt MatMulInt4 of an ONNX model (onnx.ModelProto, in place) rewritten into the nodes
    the exporter writes for the same product on MatMulNBits (`--int4-kernel onnxruntime`: the same
    codes and scales, by name; a Q4_1 offset as MatMulNBits' symmetric kernel plus the block sums of x
    times m + 8d), so that `diff --layerwise` can run it at level 4 beside level 0. Returns how many."""
    import onnx_ir as ir

    from llamatrt.exporter.quant_weights import DEFAULT_ZERO, QuantizedWeight
    from llamatrt.exporter.quantize import Initializers, replace_matmul

    rewritten = ir.from_proto(model)
    graph = rewritten.graph
    nodes = [n for n in graph if n.op_type == MATMUL_INT4 and n.domain == DOMAIN]
    if not nodes:
        return 0
    made = Initializers(graph)
    made.made.update(graph.initializers)  # the artifact's own tensors, reused by name
    for node in nodes:
        n, k, block = (node.attributes[a].as_int() for a in ("N", "K", "block_size"))
        codes, scales = (v.name for v in node.inputs[1:3] if v is not None)
        m = inits[node.inputs[3].name].T if len(node.inputs) > 3 and node.inputs[3] is not None else None
        weight = QuantizedWeight(
            4,
            block,
            n,
            k,
            inits[codes].reshape(n, -1, block // 2),
            inits[scales].reshape(n, -1),
            DEFAULT_ZERO[4] if m is None else 0,
            m,
            "the artifact's blocks",
        )
        if node.attributes.get_int("swiglu", 0):
            _unfuse_swiglu(graph, node, n, made)
        replace_matmul(graph, node, codes.removesuffix(".q4"), {"": weight}, made, accuracy_level=0)
    rewritten.opset_imports.setdefault(MS_DOMAIN, 1)
    model.CopyFrom(ir.to_proto(rewritten))
    return len(nodes)


def _unfuse_swiglu(graph: Any, node: Any, n: int, made: Any) -> None:
    """A MatMulInt4 with swiglu = 1 (exporter.ort_fusions.fuse_swiglu) given back the nodes it
    replaced: its readers now read silu(P[..., :N/2]) * P[..., N/2:] of its plain product P. The
    slice bounds are initializers (`made`, exporter.quantize.Initializers), shared by the layers."""
    import onnx_ir as ir

    product = node.outputs[0]
    readers = list(product.uses())
    start, middle, end, axis = (
        made.get(name, np.array([value], dtype=np.int64))
        for name, value in (
            ("swiglu.start", 0),
            (f"swiglu.half.{n}", n // 2),
            (f"swiglu.end.{n}", n),
            ("swiglu.axis", -1),
        )
    )
    gate = ir.node("Slice", [product, start, middle, axis])
    up = ir.node("Slice", [product, middle, end, axis])
    sigmoid = ir.node("Sigmoid", [gate.outputs[0]])
    silu = ir.node("Mul", [gate.outputs[0], sigmoid.outputs[0]])
    out = ir.node("Mul", [silu.outputs[0], up.outputs[0]])
    for use in readers:
        use.node.replace_input_with(use.idx, out.outputs[0])
    if product.is_graph_output():
        graph.outputs[graph.outputs.index(product)] = out.outputs[0]
    graph.insert_after(node, [gate, up, sigmoid, silu, out])
    out.outputs[0].name, product.name = product.name, f"{product.name}/gate_up"
    node.attributes.pop("swiglu")


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
        set_exact_activations(model)
        onnx.save(model, str(out / graph.path))
    # a portable graph's DequantizeLinear -> MatMul runs at the manifest's level (OrtBackend)
    exact = {"accuracy_level": 0} | (
        {"int4_activation_bits": [EXACT_ACTIVATION_BITS]} if "int4_activation_bits" in manifest.quantization else {}
    )
    return replace(manifest, quantization={**manifest.quantization, **exact})
