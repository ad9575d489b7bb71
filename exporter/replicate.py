"""A graph of every decoder layer, made from the graph of a two-layer twin.

A Llama's decoder layers are one computation repeated over their own weights. So the exporter traces
(and validates) a twin of the model cut to its first two layers — the checkpoint's own layers 0 and
1, its embedding and head: one layer's worth of memory and seconds of tracing — and writes layers
2..L-1 as copies of layer 1's nodes. Their weights are not made here: each copy's initializers are
streamed tensors (exporter.weights_file.streamed_tensor) that read, upcast or quantize their layer's
parameter only when the weights file is written.

Layer 1 is the template, not layer 0: its input is a previous layer's residual stream, as every later
layer's is. Its nodes are found by data flow, not by name: those that depend on its input, its cache
or its weights, and that its output or its cache's update depends on — which holds after the graph
rewrites that leave no module path on the nodes they make (MatMulNBits, Q4_1's block sums). What
cannot be copied safely (a value of the template read elsewhere, a float tensor only the template
reads that is not one of its parameters) stops the export with a message, never a wrong graph.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llamatrt.base.artifact.precision import dtype_name
from llamatrt.base.errors import ValidationError
from llamatrt.exporter.quant_weights import STORED
from llamatrt.exporter.weights_file import ParameterViews, stored_forms, streamed_tensor

if TYPE_CHECKING:
    import onnx_ir as ir

TWIN_DEPTH = 2  # layers of the traced twin; its last is the template
TEMPLATE = TWIN_DEPTH - 1
_TEMPLATE_LAYER = re.compile(rf"layers\.{TEMPLATE}(?!\d)")
_ANY_LAYER = re.compile(r"layers\.(\d+)")
PARTS = (".high", ".low")  # an 8-bit weight held as two 4-bit halves (exporter.quantize.held_parts)


def at_layer(name: str, layer: int) -> str:
    """A template name (parameter, initializer, module path) as layer `layer`'s."""
    return _TEMPLATE_LAYER.sub(f"layers.{layer}", name)


@dataclass(frozen=True)
class LayerTensor:
    """How one of the template's initializers is made from its layer's parameter: a float form of
    it (`transposed`, stored as `dtype`), or a tensor of its quantized blocks (`suffix`, a key of
    exporter.quant_weights.STORED, of the held `part`)."""

    param: str  # the template's StaticLlama parameter, `model.layers.1....`
    transposed: bool = False
    dtype: str = ""  # a float form's stored dtype (torch's name)
    part: str = ""
    suffix: str = ""

    @property
    def quantized(self) -> bool:
        return bool(self.suffix)

    def name(self, layer: int) -> str:
        """The initializer's name in layer `layer`: what it is, so every graph of the artifact names
        (and the weights file stores) one tensor alike."""
        form = self.part + self.suffix if self.quantized else f"{'.T' if self.transposed else ''}.{self.dtype}"
        return at_layer(self.param, layer) + form


# Makes layer i's tensor for a template initializer: (what it is, layer) -> tensor
TensorMaker = Callable[[LayerTensor, int], "ir.TensorProtocol"]


def template_tensors(model: ir.Model, params: Mapping[str, torch.Tensor]) -> dict[str, LayerTensor]:
    """Template initializer name -> what it is made of. `params`: the twin's state dict as the
    traced model held it. Quantized tensors are named `{parameter}{part}{suffix}` by the rewrites;
    float ones are a parameter or a whole view of one (a pre-transposed weight the exporter named
    `val_N`), found by address, or else (an fp16 graph's folded fp32 upcast of a norm) by content
    among the template's parameters' stored forms."""
    template = {name: t for name, t in params.items() if name.startswith(f"model.layers.{TEMPLATE}.")}
    views = ParameterViews(params)
    by_content: dict[str, LayerTensor] | None = None  # made only if a tensor is no view of a parameter
    sizes = {t.numel() * t.element_size() for t in template.values()} | {t.numel() * 4 for t in template.values()}
    found: dict[str, LayerTensor] = {}
    for value in model.graph.initializers.values():
        name, tensor = value.name or "", value.const_value
        if tensor is None:
            continue
        quantized = _quantized_tensor(name, template)
        view = views.find(tensor)
        if quantized is not None:
            found[name] = quantized
        elif view is not None:
            # a parameter of layer 0 stands for layer 1's where the exporter merged equal tensors
            # (layer 1 then reads it; its copies must read their own)
            param = re.sub(rf"^model\.layers\.{TEMPLATE - 1}\.", f"model.layers.{TEMPLATE}.", view[0])
            if param in template and template[param].shape == params[view[0]].shape:
                found[name] = LayerTensor(param, view[1], _FLOAT_NAMES[tensor.dtype.name])
        elif tensor.dtype.is_floating_point() and tensor.nbytes in sizes:  # e.g. an fp16 norm's folded fp32 upcast
            if by_content is None:
                by_content = {
                    _digest(form): LayerTensor(param, transposed, dtype_name(form.dtype))
                    for param, t in template.items()
                    for form, transposed in stored_forms(t)
                }
            hit = by_content.get(hashlib.sha1(tensor.tobytes()).hexdigest())
            if hit is not None:
                found[name] = hit
    return found


_FLOAT_NAMES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16"}


def ir_float(dtype: str) -> ir.DataType:
    """onnx_ir's type of a float stored form (torch's dtype name)."""
    import onnx_ir as ir

    return ir.DataType[next(k for k, v in _FLOAT_NAMES.items() if v == dtype)]


def _quantized_tensor(name: str, template: Mapping[str, torch.Tensor]) -> LayerTensor | None:
    for param in template:
        if name.startswith(param) and name != param:
            rest = name[len(param) :]
            part = next((p for p in PARTS if rest.startswith(p)), "")
            if rest[len(part) :] in STORED:
                return LayerTensor(param, part=part, suffix=rest[len(part) :])
    return None


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class _Template:
    nodes: list[ir.Node]  # in graph order
    hidden_in: ir.Value  # the residual stream layer 1 reads
    hidden_out: ir.Value  # the residual stream it writes
    past: tuple[ir.Value, ir.Value]  # its cache inputs (key, value)
    present: tuple[ir.Value, ir.Value]  # its cache outputs


def replicate_layers(model: ir.Model, num_layers: int, tensors: Mapping[str, LayerTensor], make: TensorMaker) -> None:
    """Grow the twin's graph (in place) to `num_layers` decoder layers: layers 2..L-1 as copies of
    layer 1, their caches appended to the graph's inputs and outputs in the IO contract's order."""
    if num_layers <= TWIN_DEPTH:
        return
    graph = model.graph
    template = _find_template(graph, tensors)
    members = set(template.nodes)
    readers = [(node, i) for node, i in template.hidden_out.uses() if node not in members]
    anchor = next(node for node in graph if node in {n for n, _ in readers})
    hidden = template.hidden_out
    for layer in range(TWIN_DEPTH, num_layers):
        hidden = _copy_layer(graph, template, layer, hidden, tensors, make, anchor)
    for node, i in readers:
        node.replace_input_with(i, hidden)


def streamed_layer_tensors(
    model: ir.Model, num_layers: int, tensors: Mapping[str, LayerTensor], make: TensorMaker
) -> list[tuple[str, int, Callable[[], ir.TensorProtocol]]]:
    """(streamed key, bytes, maker) of each weight that `replicate_layers` will give layers 2..L-1
    of `model`, in the order it registers them: what the weights writer can write in the background
    while other graphs are traced, so the replicated graphs find them written. Each is the size of
    its template tensor, which `_checked` holds it to."""
    if num_layers <= TWIN_DEPTH:
        return []
    template = _find_template(model.graph, tensors)
    weights = [(t, v.const_value) for t, v in _layer_weights(model.graph, template, tensors)]
    return [
        (tensor.name(layer), like.nbytes, functools.partial(_checked, make, tensor, layer, like.dtype, _shape(like)))
        for layer in range(TWIN_DEPTH, num_layers)
        for tensor, like in weights
        if like is not None
    ]


def expected_layer_tensors(
    shapes: Mapping[str, Sequence[int]], dtype: str, num_layers: int, make: TensorMaker
) -> list[tuple[str, int, Callable[[], ir.TensorProtocol]]]:
    """What `streamed_layer_tensors` gives a float export, known before any graph is traced: each
    matrix of the template layer transposed to MatMul's [in, out] in the graph's dtype, each norm
    in fp32 (the graphs compute norms in fp32; a half-precision graph reads the upcast folded), any
    other parameter (a projection's bias) as it is, in the graph's dtype.
    The export streams these while the twin is made and traced, and keeps them only if the trace
    then asks for exactly these (`shapes`: the template's parameters, `model.layers.1.*`, and
    their shapes). A checkpoint whose layers hold equal norms misses (the exporter merges equal
    tensors) and is streamed again from the trace."""
    if num_layers <= TWIN_DEPTH:
        return []
    expected = []
    for param, shape in shapes.items():
        matrix = len(shape) == 2
        norm = param.rsplit(".", 2)[-2].endswith("norm")  # `...input_layernorm.weight`
        tensor = LayerTensor(param, transposed=matrix, dtype="float32" if norm else dtype)
        stored = ir_float(tensor.dtype)
        expected.append((tensor, stored, tuple(shape[::-1]) if matrix else tuple(shape)))
    return [
        (
            tensor.name(layer),
            int(math.prod(shape) * stored.itemsize),
            functools.partial(_checked, make, tensor, layer, stored, shape),
        )
        for layer in range(TWIN_DEPTH, num_layers)
        for tensor, stored, shape in expected
    ]


def _layer_weights(
    graph: ir.Graph, template: _Template, tensors: Mapping[str, LayerTensor]
) -> list[tuple[LayerTensor, ir.Value]]:
    """The template's weights that its nodes read, with their initializers: layer 0's own weights,
    which `template_tensors` also finds as layer 1's stand-ins, are read by layer 0 alone."""
    read = {v for node in template.nodes for v in node.inputs if v is not None}
    return [(tensor, graph.initializers[name]) for name, tensor in tensors.items() if graph.initializers[name] in read]


def _find_template(graph: ir.Graph, tensors: Mapping[str, LayerTensor]) -> _Template:
    outputs_of: dict[int, ir.Value] = {}  # layer -> its last residual Add's output (tools.layerwise does alike)
    for node in graph:
        found = _ANY_LAYER.search(node.metadata_props.get("namespace", ""))
        if found and node.op_type == "Add" and node.domain == "":
            outputs_of[int(found.group(1))] = node.outputs[0]
    inputs, outputs = {v.name: v for v in graph.inputs}, {v.name: v for v in graph.outputs}
    past = (inputs.get(f"past_key_values.{TEMPLATE}.key"), inputs.get(f"past_key_values.{TEMPLATE}.value"))
    present = (outputs.get(f"present.{TEMPLATE}.key"), outputs.get(f"present.{TEMPLATE}.value"))
    if TEMPLATE - 1 not in outputs_of or TEMPLATE not in outputs_of or None in past or None in present:
        raise ValidationError("the twin graph has no recognisable decoder layer 1 to replicate; please report")
    hidden_in, hidden_out = outputs_of[TEMPLATE - 1], outputs_of[TEMPLATE]
    # layer 1 is what its outputs need beyond what layer 0's output needed: its own nodes and the
    # constant expressions of its own weights (shared values, the mask, RoPE, are layer 0's too)
    before = _upstream([hidden_out, *present])  # type: ignore[list-item]
    shared = _upstream([hidden_in])
    nodes = [node for node in graph if node in before and node not in shared]
    members = set(nodes)
    for node in nodes:
        for value in node.outputs:
            outside = [n for n, _ in value.uses() if n not in members]
            if outside and value is not hidden_out:
                raise ValidationError(
                    f"cannot replicate decoder layers: {value.name} of layer {TEMPLATE} is read outside it "
                    f"(by {outside[0].op_type}); please report with the model config"
                )
    for value in graph.initializers.values():
        uses = [n for n, _ in value.uses()]
        only_template = uses and all(n in members for n in uses)
        tensor = value.const_value
        if only_template and value.name not in tensors and tensor is not None and _is_array(tensor):
            raise ValidationError(
                f"cannot replicate decoder layers: {value.name} is read by layer {TEMPLATE} alone but is "
                "none of its parameters; please report with the model config"
            )
    return _Template(nodes, hidden_in, hidden_out, past, present)  # type: ignore[arg-type]


def _is_array(tensor: ir.TensorProtocol) -> bool:
    """A float tensor of more than one value: what a layer's own weight would be, not a constant."""
    return tensor.dtype.is_floating_point() and tensor.size > 1


def _upstream(values: Iterable[ir.Value]) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    todo = [v.producer() for v in values]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(v.producer() for v in node.inputs if v is not None)
    return seen


def _shape(tensor: ir.TensorProtocol) -> tuple[int, ...]:
    return tuple(tensor.shape.numpy())


def _checked(
    make: TensorMaker, tensor: LayerTensor, layer: int, dtype: ir.DataType, shape: tuple[int, ...]
) -> ir.TensorProtocol:
    """Layer `layer`'s tensor, which must have the template's type and shape: what its nodes read."""
    made = make(tensor, layer)
    if made.dtype != dtype or _shape(made) != shape:
        raise ValidationError(
            f"{tensor.name(layer)} is {made.dtype.name}{list(_shape(made))} where layer {TEMPLATE}'s is "
            f"{dtype.name}{list(shape)}: the checkpoint's layers differ in shape or format; "
            "export the float checkpoint (an HF folder) instead"
        )
    return made


def _copy_layer(
    graph: ir.Graph,
    template: _Template,
    layer: int,
    hidden: ir.Value,
    tensors: Mapping[str, LayerTensor],
    make: TensorMaker,
    anchor: ir.Node,
) -> ir.Value:
    """Insert layer `layer`'s nodes before `anchor`, reading `hidden`; returns its output."""
    import onnx_ir as ir

    mapping: dict[ir.Value, ir.Value] = {template.hidden_in: hidden}
    for which, value in zip(("key", "value"), template.past, strict=True):
        copy = ir.Value(name=f"past_key_values.{layer}.{which}", shape=value.shape, type=value.type)
        graph.inputs.append(copy)
        mapping[value] = copy
    for tensor, source in _layer_weights(graph, template, tensors):
        assert source.const_value is not None
        stored = streamed_tensor(
            tensor.name(layer),
            functools.partial(_checked, make, tensor, layer, source.const_value.dtype, _shape(source.const_value)),
            source.const_value.dtype,
            source.const_value.shape.numpy(),
        )
        copy = ir.Value(name=tensor.name(layer), shape=source.shape, type=source.type, const_value=stored)
        graph.register_initializer(copy)
        mapping[source] = copy
    nodes = []
    for node in template.nodes:
        copy_node = ir.Node(
            node.domain,
            node.op_type,
            [None if v is None else mapping.get(v, v) for v in node.inputs],
            list(node.attributes.values()),
            overload=node.overload,
            num_outputs=len(node.outputs),
            version=node.version,
            name=f"layers.{layer}/{node.name}" if node.name else None,
            metadata_props={k: at_layer(v, layer) for k, v in node.metadata_props.items()},
        )
        for old, new in zip(node.outputs, copy_node.outputs, strict=True):
            new.name = f"layers.{layer}/{old.name}"
            new.shape, new.type = old.shape, old.type
            mapping[old] = new
        nodes.append(copy_node)
    graph.insert_before(anchor, nodes)
    for which, value in zip(("key", "value"), template.present, strict=True):
        out = mapping[value]
        out.name = f"present.{layer}.{which}"
        graph.outputs.append(out)
    return mapping[template.hidden_out]
