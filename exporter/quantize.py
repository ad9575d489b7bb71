"""Weight-only quantization of an exported ONNX Runtime graph: MatMul -> com.microsoft.MatMulNBits.

Runs on the optimized graph before the weights are written. Every linear layer whose float weight
is a model parameter (found by content, as exporter.weights_file does: the exporter renames and
pre-transposes weights) becomes one MatMulNBits node over that parameter's blocks; the tied output
head (MatMul over Transpose(embedding)) too. The embedding lookup reads the same blocks: a Gather of
the packed rows, unpacked and scaled with standard ops (ONNX Runtime's GatherBlockQuantized wants its
own layout, and sharing the head's bytes keeps one copy of the tied matrix). Q4_1 blocks (`d·q + m`
= `d·(q - 8) + (m + 8d)`) run MatMulNBits' symmetric kernel and add `Σ_b (m + 8d)[n, b] · Σ_{k in b}
x[k]`, a small fp32 MatMul of the activations' block sums. `rewrite_weight_uses` is the walk over a
graph's weight uses that this rewrite and the portable one (exporter.quantize_portable) share.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from llamatrt.base.artifact.variants import MS_DOMAIN
from llamatrt.base.custom_ops import DOMAIN, MATMUL_INT4
from llamatrt.exporter.quant_weights import DEFAULT_ZERO, STORED, QuantizedWeight

if TYPE_CHECKING:
    import onnx_ir as ir


@dataclass
class _Builder:
    graph: ir.Graph
    before: ir.Node
    nodes: list[ir.Node]

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", **attributes: Any) -> ir.Value:
        import onnx_ir as ir

        node = ir.Node(domain, op_type, inputs, ir.convenience.convert_attributes(attributes), num_outputs=1)
        self.nodes.append(node)
        return node.outputs[0]

    def flush(self) -> None:
        self.graph.insert_before(self.before, self.nodes)
        self.nodes = []


class Initializers:
    """One graph initializer per array, made once (the head and the embedding share theirs)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.made: dict[str, ir.Value] = {}

    def get(self, name: str, array: np.ndarray) -> ir.Value:
        import onnx_ir as ir

        if name not in self.made:
            value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
            self.graph.register_initializer(value)
            self.made[name] = value
        return self.made[name]

    def get_tensor(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        """As `get`, for a tensor numpy cannot hold as it is stored (int4)."""
        import onnx_ir as ir

        if name not in self.made:
            tensor.name = name
            value = ir.Value(name=name, const_value=tensor)
            self.graph.register_initializer(value)
            self.made[name] = value
        return self.made[name]


def content_key(array: np.ndarray, rows: int = 256) -> str:
    """A hash of the array's values in C order, a few rows at a time: a transposed view of a large
    weight (the embedding) is never copied whole."""
    digest = hashlib.sha1()
    if array.flags.c_contiguous:
        digest.update(array.reshape(-1).view(np.uint8).data)
    else:
        for start in range(0, array.shape[0], rows):
            digest.update(np.ascontiguousarray(array[start : start + rows]).reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


MatMulRewrite = Callable[["ir.Node", str, Initializers], None]
GatherRewrite = Callable[["ir.Node", str, Initializers], bool]


def rewrite_weight_uses(
    model: ir.Model,
    weights: Mapping[str, QuantizedWeight],
    floats: Mapping[str, np.ndarray],
    on_matmul: MatMulRewrite,
    on_gather: GatherRewrite,
    after_read: Callable[[], object] = lambda: None,
) -> list[str]:
    """Call `on_matmul` for every MatMul whose B is a quantized parameter (pre-transposed, or a
    Transpose of it) and `on_gather` for every lookup of one (it returns whether it rewrote it), then
    drop the float copies nothing reads any more. `floats` are the parameters ([N, K] float32) as the
    exporter's model holds them (found by content). Returns the parameters rewritten, in graph order.
    `after_read` runs after each parameter's values are read to find it (the exporter gives back the
    pages of its mapped parameters, so matching them does not hold the whole twin)."""
    graph = model.graph

    def key(array: np.ndarray) -> str:
        found = content_key(array)
        after_read()
        return found

    plain = {key(w): name for name, w in floats.items() if name in weights}
    transposed = {key(w.T): name for name, w in floats.items() if name in weights}
    inits = Initializers(graph)
    done: list[str] = []
    for node in list(graph):
        if node.op_type == "MatMul" and node.domain == "":
            name = weight_name(node.inputs[1], plain, transposed, key)
            if name is not None:
                on_matmul(node, name, inits)
                done.append(name)
        elif node.op_type == "Gather" and node.domain == "" and node.inputs[0] is not None:
            source = node.inputs[0].const_value
            name = None if source is None else plain.get(key(source.numpy()))
            if name is not None and node.attributes.get_int("axis", 0) == 0 and on_gather(node, name, inits):
                done.append(name)
    remove_dead_nodes(graph)
    for value in list(graph.initializers.values()):  # the float copies nothing reads now
        if not value.uses() and value.name not in inits.made:
            graph.initializers.pop(value.name or "")
    return list(dict.fromkeys(done))


def quantize_graph(
    model: ir.Model,
    weights: Mapping[str, QuantizedWeight],
    floats: Mapping[str, np.ndarray],
    accuracy_level: int,
    after_read: Callable[[], object] = lambda: None,
    own_int4: bool = False,
) -> list[str]:
    """Rewrite `model` in place: MatMulNBits for every projection (`own_int4`: MatMulInt4 for the 4-bit
    ones), a dequantizing lookup (`after_read`: as rewrite_weight_uses)."""

    def matmul(node: ir.Node, name: str, inits: Initializers) -> None:
        parts = held_parts(weights[name], accuracy_level)
        replace_matmul(model.graph, node, name, parts, inits, accuracy_level, own_int4)

    def lookup(node: ir.Node, name: str, inits: Initializers) -> bool:
        _replace_lookup(model.graph, node, name, held_parts(weights[name], accuracy_level), inits)
        return True

    model.opset_imports.setdefault(MS_DOMAIN, 1)
    if own_int4:
        model.opset_imports.setdefault(DOMAIN, 1)
    return rewrite_weight_uses(model, weights, floats, matmul, lookup, after_read)


def held_parts(weight: QuantizedWeight, accuracy_level: int) -> dict[str, QuantizedWeight]:
    """How the graph holds a weight, by initializer-name suffix: as it is, or an 8-bit weight with
    fp32 activations whose rows do not split into activation blocks as two exact 4-bit halves
    (QuantizedWeight.nibble_halves), which both the head and the tied lookup read, so the matrix is
    still held once. (An 8-bit weight whose rows do split runs as two int8 passes: `_two_pass`.)"""
    if weight.bits == 8 and accuracy_level == 0 and not _splits_into_blocks(weight):
        high, low = weight.nibble_halves()
        return {".high": high, ".low": low}
    return {"": weight}


def _splits_into_blocks(weight: QuantizedWeight) -> bool:
    return weight.k % weight.block == 0


def remove_dead_nodes(graph: ir.Graph) -> None:
    """Nodes nothing reads any more (the head's Transpose of the float embedding)."""
    outputs = set(graph.outputs)
    changed = True
    while changed:
        dead = [n for n in graph if all(not v.uses() and v not in outputs for v in n.outputs)]
        graph.remove(dead, safe=True)
        changed = bool(dead)


def weight_name(
    value: ir.Value | None,
    plain: Mapping[str, str],
    transposed: Mapping[str, str],
    key: Callable[[np.ndarray], str],
) -> str | None:
    """The parameter a MatMul's B input is: a pre-transposed initializer, or Transpose(parameter);
    `key` is the content key of the arrays it reads (rewrite_weight_uses's)."""
    if value is None:
        return None
    if value.const_value is not None and len(value.const_value.shape) == 2:
        return transposed.get(key(value.const_value.numpy()))
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.inputs[0] is not None:
        source = producer.inputs[0].const_value
        if source is not None and len(source.shape) == 2:
            return plain.get(key(source.numpy()))
    return None


def _quantized_inputs(name: str, weight: QuantizedWeight, inits: Initializers) -> list[ir.Value]:
    """Codes and scales, as MatMulNBits takes them with its default zero point."""
    assert weight.zero == DEFAULT_ZERO[weight.bits] or (weight.zero == 0 and weight.offsets is not None), (
        "only Q4_1's zero point 0 is not MatMulNBits' default"
    )
    packed = f".q{weight.bits}"
    return [inits.get(name + packed, STORED[packed](weight)), inits.get(f"{name}.scales", STORED[".scales"](weight))]


def replace_matmul(
    graph: ir.Graph,
    node: ir.Node,
    name: str,
    parts: Mapping[str, QuantizedWeight],
    inits: Initializers,
    accuracy_level: int,
    own_int4: bool = False,
) -> None:
    import onnx_ir as ir

    build = _Builder(graph, node, [])
    products = [
        _product(build, node.inputs[0], name + suffix, weight, inits, accuracy_level, own_int4)
        for suffix, weight in parts.items()
    ]
    out = products[0] if len(products) == 1 else build.op("Add", *products)
    build.flush()
    ir.convenience.replace_all_uses_with(node.outputs[0], out, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def _product(
    build: _Builder,
    x: ir.Value | None,
    name: str,
    weight: QuantizedWeight,
    inits: Initializers,
    accuracy_level: int,
    own_int4: bool = False,
) -> ir.Value:
    """x @ W^T for one held weight."""
    packed, scales = _quantized_inputs(name, weight, inits)
    if own_int4 and accuracy_level == 0 and weight.fits_matmul_int4():
        # the same codes, scales and (Q4_1) offsets as MatMulNBits reads: the weights file is the same
        offsets = [] if weight.offsets is None else [inits.get(f"{name}.offsets", STORED[".offsets"](weight))]
        shape = {"K": weight.k, "N": weight.n, "block_size": weight.block}
        bits = weight.activation_bits()
        return build.op(MATMUL_INT4, x, packed, scales, *offsets, domain=DOMAIN, activation_bits=bits, **shape)
    if weight.bits == 8 and accuracy_level == 0 and _splits_into_blocks(weight):
        return _two_pass(build, x, packed, scales, weight, inits)
    out = build.op(
        "MatMulNBits",
        x,
        packed,
        scales,
        domain=MS_DOMAIN,
        K=weight.k,
        N=weight.n,
        bits=weight.bits,
        block_size=weight.block,
        accuracy_level=accuracy_level,
    )
    if weight.offsets is not None:
        # Q4_1's d·q + m = d·(q - 8) + (m + 8·d): the product runs on MatMulNBits' symmetric kernel
        # (an explicit zero point of 0 costs it 6% of a SmolLM2 step), and (block sums of x) @ (m + 8·d)^T
        # adds the rest. The artifact keeps the file's d and m: the sum is a constant expression of
        # them that ONNX Runtime folds once at load.
        m_t = inits.get(f"{name}.offsets", STORED[".offsets"](weight))  # [blocks, N]
        d_t = build.op("Transpose", scales, perm=[1, 0])
        shifted = build.op("Add", m_t, build.op("Mul", d_t, inits.get("f32.8", np.array(8, dtype=np.float32))))
        blocked = build.op(
            "Reshape",
            x,
            inits.get(
                f"shape.blocks{weight.blocks}x{weight.block}",
                np.array([0, 0, weight.blocks, weight.block], dtype=np.int64),
            ),
        )
        sums = build.op("ReduceSum", blocked, inits.get("axes.last", np.array([-1], dtype=np.int64)), keepdims=0)
        out = build.op("Add", out, build.op("MatMul", sums, shifted))
    return out


def _two_pass(
    build: _Builder,
    x: ir.Value | None,
    packed: ir.Value,
    scales: ir.Value,
    weight: QuantizedWeight,
    inits: Initializers,
) -> ir.Value:
    """x @ W^T for an 8-bit W with fp32 activations, on MatMulNBits' int8-activation kernel (level 4),
    whose fp32 kernel has no 8-bit path (it dequantizes the whole matrix per call):

        x ──► split ──► [xq ; x - xq] ──► MatMulNBits (level 4, 2 rows) ──► row 1 + row 2

    xq is x rounded per block to the kernel's own grid (scale = block max / 127), so the kernel
    quantizes it without loss, and the remainder's rounding is all that is left: at most 1/254 of a
    block's step, against 1/2 for one int8 pass. The two rows cost one pass (the weight is read once)."""
    blocked = build.op(
        "Reshape",
        x,
        inits.get(
            f"shape.blocks{weight.blocks}x{weight.block}", np.array([0, 0, weight.blocks, weight.block], dtype=np.int64)
        ),
    )
    peak = build.op(
        "ReduceMax", build.op("Abs", blocked), inits.get("axes.last", np.array([-1], dtype=np.int64)), keepdims=1
    )
    step = build.op(
        "Max",
        build.op("Mul", peak, inits.get("f32.1/127", np.array(1 / 127, dtype=np.float32))),
        inits.get("f32.tiny", np.array(1e-30, dtype=np.float32)),  # an all-zero block: xq = 0
    )
    grid = build.op("Mul", build.op("Round", build.op("Div", blocked, step)), step)
    xq = build.op("Reshape", grid, inits.get(f"shape.rows{weight.k}", np.array([0, 0, weight.k], dtype=np.int64)))
    rows = build.op("Concat", xq, build.op("Sub", x, xq), axis=0)  # [2B, S, K]
    both = build.op(
        "MatMulNBits",
        rows,
        packed,
        scales,
        domain=MS_DOMAIN,
        K=weight.k,
        N=weight.n,
        bits=weight.bits,
        block_size=weight.block,
        accuracy_level=4,
    )
    first, second = _split_rows(build, both)
    return build.op("Add", first, second)


def _split_rows(build: _Builder, value: ir.Value) -> tuple[ir.Value, ir.Value]:
    import onnx_ir as ir

    node = ir.Node(
        "", "Split", [value], ir.convenience.convert_attributes({"axis": 0, "num_outputs": 2}), num_outputs=2
    )
    build.nodes.append(node)
    return node.outputs[0], node.outputs[1]


def _replace_lookup(
    graph: ir.Graph, node: ir.Node, name: str, parts: Mapping[str, QuantizedWeight], inits: Initializers
) -> None:
    """Gather(embedding, ids) over the quantized rows of every held part, summed."""
    import onnx_ir as ir

    build = _Builder(graph, node, [])
    rows = [_lookup(build, node.inputs[1], name + suffix, weight, inits) for suffix, weight in parts.items()]
    out = rows[0] if len(rows) == 1 else build.op("Add", *rows)
    build.flush()
    ir.convenience.replace_all_uses_with(node.outputs[0], out, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def _lookup(build: _Builder, ids: ir.Value | None, name: str, weight: QuantizedWeight, inits: Initializers) -> ir.Value:
    """One held weight's rows: unpack, subtract the zero point (or add Q4_1's offset), scale."""
    import onnx_ir as ir

    packed, scales, *_ = _quantized_inputs(name, weight, inits)
    codes = build.op("Gather", packed, ids, axis=0)  # [b, s, blocks, block*bits/8]
    if weight.bits == 4:
        low = build.op("BitwiseAnd", codes, inits.get("u8.15", np.array(15, dtype=np.uint8)))
        high = build.op("BitShift", codes, inits.get("u8.4", np.array(4, dtype=np.uint8)), direction="RIGHT")
        pair = build.op(
            "Concat",
            build.op("Unsqueeze", low, inits.get("axes.last", np.array([-1], dtype=np.int64))),
            build.op("Unsqueeze", high, inits.get("axes.last", np.array([-1], dtype=np.int64))),
            axis=-1,
        )
        codes = build.op(
            "Reshape",
            pair,
            inits.get(
                f"shape.blocks{weight.blocks}x{weight.block}",
                np.array([0, 0, weight.blocks, weight.block], dtype=np.int64),
            ),
        )
    values = build.op("Cast", codes, to=ir.DataType.FLOAT)
    scale = build.op(
        "Unsqueeze", build.op("Gather", scales, ids, axis=0), inits.get("axes.last", np.array([-1], dtype=np.int64))
    )
    if weight.offsets is not None:
        offset = build.op(
            "Unsqueeze",
            build.op("Gather", inits.get(f"{name}.offsets.rows", STORED[".offsets.rows"](weight)), ids, axis=0),
            inits.get("axes.last", np.array([-1], dtype=np.int64)),
        )
        rows = build.op("Add", build.op("Mul", scale, values), offset)
    else:
        zero = inits.get(f"f32.{weight.zero}", np.array(weight.zero, dtype=np.float32))
        rows = build.op("Mul", scale, build.op("Sub", values, zero))
    padded = weight.blocks * weight.block  # a last partial block is padded to whole (MatMulNBits' layout)
    rows = build.op("Reshape", rows, inits.get(f"shape.rows{padded}", np.array([0, 0, padded], dtype=np.int64)))
    if padded == weight.k:
        return rows
    ends = inits.get(f"slice.end{weight.k}", np.array([weight.k], dtype=np.int64))
    return build.op(
        "Slice",
        rows,
        inits.get("slice.start0", np.array([0], dtype=np.int64)),
        ends,
        inits.get("axes.last", np.array([-1], dtype=np.int64)),
    )
