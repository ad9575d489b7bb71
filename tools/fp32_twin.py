"""An fp32 twin of a bf16 or fp16 artifact's graphs: every bf16/fp16 tensor, cast and constant
becomes fp32, the weights keep their values (exactly representable in fp32), the node and tensor
names stay. The twin computes the same graph with fp32 arithmetic: a CPU machine can check a bf16
graph through it (ONNX Runtime CPU has no bf16 kernels), and comparing an fp16 graph with its twin,
tensor by tensor, shows where fp16 arithmetic departs (llamatrt.tools.layerwise).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from llamatrt.base.artifact.manifest import GraphSpec, Manifest, TensorSpec
from llamatrt.base.artifact.reader import load_graph_with_weights


def _fp32_graph(model: Any, target: Path) -> None:
    """`model` (with its weights) with every bf16/fp16 tensor, value and cast made fp32, saved at `target`."""
    import onnx
    from onnx import TensorProto, numpy_helper

    low, fp32 = (TensorProto.BFLOAT16, TensorProto.FLOAT16), TensorProto.FLOAT
    graph = model.graph
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type in low:
            graph.initializer[i].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
            )
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type in low:
            value.type.tensor_type.elem_type = fp32
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i in low:
                attribute.i = fp32
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in low:
                attribute.t.CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float32), attribute.t.name)
                )
    onnx.save(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=target.name + ".data",
        size_threshold=1024,
    )


def fp32_twin(folder: Path, manifest: Manifest, out: Path) -> Manifest:
    """Write fp32 twins of the portable graphs into `out`; returns the manifest that describes them."""
    graphs = {}
    for name, graph in manifest.graphs.items():
        if graph.attention != "portable":
            continue
        _fp32_graph(load_graph_with_weights(folder, graph.path, f"graph {name!r} path"), out / graph.path)

        def fp32(specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
            return tuple(
                dataclasses.replace(t, dtype="float32" if t.dtype in ("bfloat16", "float16") else t.dtype)
                for t in specs
            )

        graphs[name] = GraphSpec(
            graph.name,
            graph.role,
            graph.path,
            fp32(graph.inputs),
            fp32(graph.outputs),
            graph.attention,
            "float32",
        )
    return dataclasses.replace(manifest, dtype="float32", graphs=graphs)
