"""Lowering of `llamatrt::cached_attention` to ONNX Runtime's `com.microsoft.GroupQueryAttention`.

Why: the portable graph scores all C cache slots every step (a static shape), and ONNX Runtime runs
those small batched GEMMs far below memory bandwidth. GroupQueryAttention (CPU kernel) writes the
new K/V in place when past and present are one buffer and scores only slots [0, T_b) of row b,
T_b = cache_position[b, -1] + 1; it also takes the packed q/k/v projection and rotates q and k
itself. Our graph contract is kept as it is:
- query = the packed projection; position_ids and the RoPE tables (cos/sin, C x head_dim / 2, the
  values models.rope computes) drive its rotary, so left-padded rows keep their own positions;
- seqlens_k = T_b - 1 per row, from `cache_position` (each row at its own place);
- query_seqlens = S for every row: the op writes row b at [T_b - S, T_b) = cache_position[b], and
  `total_sequence_length` is only an upper bound (the capacity C);
- attention_bias = our (batch, 1, S, C) mask, indexed by absolute slot, so left padding and
  unwritten slots stay masked exactly as in the portable graph.
"""

from __future__ import annotations

from llamatrt.base.artifact.variants import ONNXRUNTIME

DOMAIN, OP_TYPE = ONNXRUNTIME.op_domain, ONNXRUNTIME.op_type
# The inputs in the order ONNX Runtime's schema declares them (the lowering passes None for unused ones).
_INPUTS = (
    "query",
    "key",
    "value",
    "past_key",
    "past_value",
    "seqlens_k",
    "total_sequence_length",
    "cos_cache",
    "sin_cache",
    "position_ids",
    "attention_bias",
    "head_sink",
    "k_scale",
    "v_scale",
    "q_norm_weight",
    "k_norm_weight",
    "query_seqlens",
)
_INT32_INPUTS = ("seqlens_k", "total_sequence_length", "query_seqlens")
_REQUIRED = ("query", "seqlens_k", "total_sequence_length")


def register_schema() -> None:
    """Teach onnx (hence the torch exporter) the op's signature; ONNX Runtime owns the semantics."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    single, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional

    def param(name: str) -> OpSchema.FormalParameter:
        kind = "M" if name in _INT32_INPUTS else "I" if name == "position_ids" else "T"
        return OpSchema.FormalParameter(name, kind, "", param_option=single if name in _REQUIRED else optional)

    outputs = [OpSchema.FormalParameter("output", "T", "")]
    outputs += [OpSchema.FormalParameter(n, "T", "", param_option=optional) for n in ("present_key", "present_value")]
    schema = OpSchema(
        OP_TYPE,
        DOMAIN,
        1,
        inputs=[param(n) for n in _INPUTS],
        outputs=outputs,
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ("M", ["tensor(int32)"], ""),
            ("I", ["tensor(int64)"], ""),
        ],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
            OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, ""),
            OpSchema.Attribute("do_rotary", OpSchema.AttrType.INT, ""),
            OpSchema.Attribute("rotary_interleaved", OpSchema.AttrType.INT, ""),
        ],
    )
    onnx.defs.register_schema(schema)


def cached_attention_to_gqa(qkv, position_ids, cos_table, sin_table, past_key, past_value, cache_position, mask):  # type: ignore[no-untyped-def]
    """ONNX lowering of models.attention.cached_attention_op (shapes are static)."""
    import onnxscript
    from onnxscript import opset18 as op

    msft = onnxscript.values.Opset(DOMAIN, 1)
    packed_heads, head_dim = int(qkv.shape[2]), int(qkv.shape[3])  # batch and seq may be symbolic
    kv_heads, capacity = int(past_key.shape[1]), int(past_key.shape[2])
    int32 = onnxscript.ir.DataType.INT32
    last_slots = op.Cast(op.Squeeze(op.Slice(cache_position, [-1], [2**62], [1]), [1]), to=int32)  # (batch,) = T_b - 1
    # [batch, seq] from the graph input, not from qkv: every layer then computes the same
    # expression of one input, which ONNX Runtime's common-subexpression pass makes one
    batch_and_seq = op.Shape(cache_position)
    seqs = op.Cast(op.Expand(op.Slice(batch_and_seq, [1], [2]), op.Slice(batch_and_seq, [0], [1])), to=int32)
    out, present_key, present_value = msft.GroupQueryAttention(
        op.Reshape(qkv, [0, 0, packed_heads * head_dim]),
        None,
        None,
        past_key,
        past_value,
        last_slots,
        op.Constant(value=onnxscript.ir.tensor(capacity, dtype=int32)),
        op.CastLike(cos_table, qkv),
        op.CastLike(sin_table, qkv),
        position_ids,
        mask,
        None,
        None,
        None,
        None,
        None,
        seqs,  # (batch,) = S: query_seqlens
        num_heads=packed_heads - 2 * kv_heads,
        kv_num_heads=kv_heads,
        scale=head_dim**-0.5,
        do_rotary=1,
        rotary_interleaved=0,
    )
    return op.Reshape(out, [0, 0, packed_heads - 2 * kv_heads, head_dim]), present_key, present_value
