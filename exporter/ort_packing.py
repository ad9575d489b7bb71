"""ONNX Runtime's graph computes only a call's real tokens: rows of different token counts share a call.

Why: on a CPU every call reads every weight once (a fixed part near a whole decode step on small
models: docs/serving.md), so a server that runs its decode rows and a waiting prompt's slice as two
calls pays it twice per step, and a step that carries prefill costs a decode step plus a prefill
call. vLLM and llama-server put both in one batch. GroupQueryAttention already takes rows of
different lengths (`query_seqlens`: row b's first n_b queries are its own; it writes only those
slots and its padded queries write nothing, though it still scores them over the row's context,
which the scheduler's budget accounts for), so only the rest of the graph needs the tokens packed:

- input_ids (rows, width), right-padded, become the packed (1, T) real tokens (`packed_tokens`)
  before anything reads them, so embedding, norms, projections and the MLP run on T tokens;
- the trace's views of the tokens as (batch, seq, ...), sized from the inputs' shapes, become
  (1, T, ...);
- each attention node's packed q/k/v are laid out (rows, width) again (`padded_tokens`: a pad
  repeats its row's last token), its output is packed back, each by one GatherND whose indices
  are made once for all layers; the trace's views between the projections and the attention
  (to (batch, seq, heads, head_dim) and back) do nothing on the packed stream and are dropped, so
  a layer's attention costs two nodes besides its own, not six to eight (a decode step's nodes each
  cost ONNX Runtime a dispatch);
- `query_lengths` is each row's n_b (the attention's query_seqlens, S for every row before);
- the logits are each row's last real token's (`padded_tokens`' last column), where they were each
  row's last position's.

A call whose rows are all full (every prefill and decode call of before) computes what it did: the
packing is then the identity. The portable graphs keep the contract's plain form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llamatrt.base.artifact import names
from llamatrt.base.artifact.variants import MS_DOMAIN, ONNXRUNTIME

if TYPE_CHECKING:
    import onnx_ir as ir

_QUERY_SEQLENS = 16  # GroupQueryAttention's input index of query_seqlens


class _Builder:
    """Nodes appended to a graph, each with one output (what the rewrite below needs)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph

    def __call__(self, op: str, *inputs: ir.Value | None, **attributes: Any) -> ir.Value:
        import onnx_ir as ir

        node = ir.node(op, list(inputs), attributes or None)
        self.graph.append(node)
        return node.outputs[0]

    def ints(self, *values: int) -> ir.Value:
        import numpy as np
        import onnx_ir as ir

        return self("Constant", value=ir.tensor(np.array(values, dtype=np.int64)))


def pack_tokens(model: ir.Model) -> None:
    """Rewrite ONNX Runtime's fused-attention graph in place to take names.PACKING_INPUTS."""
    import onnx_ir as ir

    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    if names.PACKED_TOKENS in inputs:
        return
    int64 = ir.TensorType(ir.DataType.INT64)
    ids = inputs[names.INPUT_IDS]
    assert ids.shape is not None, "the exporter gives every graph input a shape"
    rows, width = ids.shape  # each a number or open ("batch", "tokens")
    packed = ir.Value(name=names.PACKED_TOKENS, type=int64, shape=ir.Shape(["packed"]))
    padded = ir.Value(name=names.PADDED_TOKENS, type=int64, shape=ir.Shape([rows, width]))
    lengths = ir.Value(name=names.QUERY_LENGTHS, type=int64, shape=ir.Shape([rows]))
    graph.inputs.extend([packed, padded, lengths])
    attention = [n for n in graph if n.op_type == ONNXRUNTIME.op_type and n.domain == ONNXRUNTIME.op_domain]
    last = _last_position_slice(model)
    if not attention or last is None:
        raise ValueError("not ONNX Runtime's fused-attention graph: no GroupQueryAttention or no last-position slice")

    views = _token_views(ids)
    uses = list(ids.uses())
    add = _Builder(graph)
    real = add("Shape", packed)  # (T,)
    for view in views:  # (batch, seq, ...) -> (1, T, ...): the same view of the packed tokens
        shape = view.inputs[1]
        sizes = shape.producer() if shape is not None else None
        assert sizes is not None, "_token_views found it"
        view.replace_input_with(1, add("Concat", add.ints(1), real, *sizes.inputs[2:], axis=0))
    first_axis, one_row, last_axis = add.ints(0), add.ints(1, -1), add.ints(-1)
    packed_ids = add("Gather", add("Reshape", ids, one_row), packed, axis=1)
    for user, index in uses:
        user.replace_input_with(index, packed_ids)  # (1, T): every later node sees T tokens in one row
    query_lengths = add("Cast", lengths, to=ir.DataType.INT32)
    # GatherND's indices, made once for every layer: (0, t) for each padded slot, (row, column) for each real token
    padded_at = add("Unsqueeze", padded, last_axis)
    to_rows = add("Concat", add("Sub", padded_at, padded_at), padded_at, axis=-1)  # (rows, width, 2)
    row_width = add("Shape", padded, start=1, end=2)
    by_row_index = [add("Unsqueeze", add(op, packed, row_width), last_axis) for op in ("Div", "Mod")]
    to_packed = add("Unsqueeze", add("Concat", *by_row_index, axis=-1), first_axis)  # (1, T, 2)
    for node in attention:
        # (1, T, packed heads) -> (rows, width, packed heads): a pad repeats its row's last token
        heads, kv_heads = node.attributes.get_int("num_heads"), node.attributes.get_int("kv_num_heads")
        past_key = node.inputs[3]  # (batch, kv_heads, capacity, head_dim)
        assert past_key is not None and past_key.shape is not None and isinstance(past_key.shape[-1], int)
        head_dim, qkv = past_key.shape[-1], node.inputs[0]
        assert qkv is not None, "GroupQueryAttention's packed q/k/v"
        qkv = _without_views_before(qkv, (heads + 2 * kv_heads) * head_dim)
        node.replace_input_with(0, add("GatherND", qkv, to_rows))
        node.replace_input_with(_QUERY_SEQLENS, query_lengths)
        out = node.outputs[0]  # (rows, width, heads * head_dim)
        out_uses = list(out.uses())
        packed_out = add("GatherND", out, to_packed)  # (1, T, heads * head_dim): the real queries'
        for user, index in out_uses:
            user.replace_input_with(index, packed_out)
        _skip_views_after(packed_out, heads * head_dim)
    # each row's last real token: the last column of padded_tokens, (rows, 1)
    last_tokens = add("Slice", padded, add.ints(-1), add.ints(1 << 62), add.ints(1))
    hidden = last.inputs[0]  # (1, T, hidden) now
    rows_last = add("Squeeze", add("Gather", hidden, last_tokens, axis=1), first_axis)  # (rows, 1, hidden)
    ir.convenience.replace_all_uses_with(last.outputs[0], rows_last)
    graph.remove(last, safe=True)
    for node in graph:  # the shapes recorded by the trace no longer hold: ONNX Runtime infers its own
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None
    graph.sort()
    ir.passes.common.RemoveUnusedNodesPass()(model)
    model.opset_imports.setdefault(MS_DOMAIN, 1)


def _projection_widths(node: ir.Node | None) -> tuple[int, int] | None:
    """(K, N) of a node that maps each token's K values to N, keeping the leading dims: MatMulInt4 and
    MatMulNBits (attributes; N / 2 out with MatMulInt4's swiglu), or MatMul by a constant [K, N]."""
    if node is None:
        return None
    if "K" in node.attributes and "N" in node.attributes:
        halved = node.attributes.get_int("swiglu", 0) == 1
        return node.attributes.get_int("K"), node.attributes.get_int("N") // (2 if halved else 1)
    right = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
    weight = right.const_value if right is not None else None
    if weight is None or len(weight.shape) != 2:
        return None
    k, n = weight.shape.numpy()
    return int(k), int(n)


def _is_view(node: ir.Node) -> bool:
    return node.op_type == "Reshape" and node.domain == ""


def _without_views_before(value: ir.Value, width: int) -> ir.Value:
    """The projection output that `value` is Reshapes of, where it gives `width` values a token: on the
    packed stream every such value is (1, T, width) already, and the trace's views of it (to
    (1, T, heads, head_dim) and back) are work ONNX Runtime cannot know is none. Else `value`."""
    source = value
    while (node := source.producer()) is not None and _is_view(node) and node.inputs[0] is not None:
        source = node.inputs[0]
    widths = _projection_widths(source.producer())
    return source if widths is not None and widths[1] == width else value


def _skip_views_after(value: ir.Value, width: int) -> None:
    """Feed `value`, (1, T, width), straight to each projection that the trace reached through views
    (chains of Reshapes) of it; other users keep the views."""
    views = [user for user, _ in value.uses() if _is_view(user)]
    while views:
        for consumer, index in list(views.pop().outputs[0].uses()):
            widths = _projection_widths(consumer)
            if _is_view(consumer):
                views.append(consumer)
            elif index == 0 and widths is not None and widths[0] == width:
                consumer.replace_input_with(0, value)


def _token_views(ids: ir.Value) -> list[ir.Node]:
    """The trace's reshapes of the tokens' stream to (batch, seq, ...): each sizes its first two dims
    by a Shape node (the batch from the cache's shape, the tokens from position_ids')."""
    views, seen, stack = [], set(), [ids]
    while stack:
        for node, _ in stack.pop().uses():
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.extend(node.outputs)
            shape = node.inputs[1] if node.op_type == "Reshape" and len(node.inputs) > 1 else None
            sizes = shape.producer() if shape is not None else None
            if sizes is None or sizes.op_type != "Concat":
                continue
            leading = [v.producer() if v is not None else None for v in sizes.inputs[:2]]
            if len(sizes.inputs) < 3 or any(p is None or p.op_type != "Shape" for p in leading):
                raise ValueError(f"a reshape of the tokens ({node.name}) is sized in a way packing does not know")
            views.append(node)
    return views


def _last_position_slice(model: ir.Model) -> ir.Node | None:
    """The Slice that takes each row's last position before the final norm and the head: the first
    Slice on the way back from the logits."""
    value = model.graph.outputs[0]
    for _ in range(16):
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Slice" and node.domain == "":
            return node
        computed = [v for v in node.inputs if v is not None and v.const_value is None and v.producer() is not None]
        if not computed:
            return None
        value = computed[0]
    return None
