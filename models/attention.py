"""Attention over the static KV cache: rotate q/k, write the cache, softmax(q·Kᵀ·scale + mask)·V.

Two forms of one computation:
- `reference_attention`, explicit ops (the eager path and the portable ONNX graph that TensorRT
  builds): the whole cache of C slots is scored every call, masked to the visible ones.
- under export with RoPE tables given (StaticLlama.forward's rope_tables), the custom op
  `llamatrt::cached_attention`, which the exporter lowers to ONNX Runtime's
  `com.microsoft.GroupQueryAttention` (exporter.ort_attention). One node takes the packed
  projection, rotates q/k, writes the new K/V in place and scores only the slots up to the last
  one written, so a decode step at context 100 reads 100 cache rows per head, not C.
  Its eager body is the reference, and every export checks the two against each other.
"""

from __future__ import annotations

import torch

from llamatrt.models.kv_cache import write_kv
from llamatrt.models.rope import Rotary, apply_rope, rope_from_tables


def cached_attention(
    qkv: torch.Tensor,  # (batch, seq, heads + 2 * kv_heads, head_dim): the packed projection, unrotated
    rotary: Rotary,
    past_key: torch.Tensor,  # (batch, kv_heads, max_cache_len, head_dim)
    past_value: torch.Tensor,
    cache_position: torch.Tensor,  # (batch, seq) int64: the slots each row writes
    mask: torch.Tensor,  # (batch, 1, seq, max_cache_len) fp32 additive
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> out (batch, seq, heads, head_dim), present_key, present_value."""
    if rotary.tables is not None and torch.compiler.is_exporting():
        return cached_attention_op(qkv, rotary.position_ids, *rotary.tables, past_key, past_value, cache_position, mask)
    return reference_attention(qkv, rotary.cos, rotary.sin, past_key, past_value, cache_position, mask)


def reference_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,  # (batch, seq, 1, head_dim)
    sin: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    cache_position: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq, _, head_dim = qkv.shape
    kv_heads = past_key.shape[1]
    heads = qkv.shape[2] - 2 * kv_heads
    groups = heads // kv_heads
    qk = apply_rope(qkv[:, :, : heads + kv_heads], cos, sin)  # queries and keys rotated in one go
    present_key = write_kv(past_key, qk[:, :, heads:].transpose(1, 2), cache_position)
    present_value = write_kv(past_value, qkv[:, :, heads + kv_heads :].transpose(1, 2), cache_position)
    # Explicit attention, not SDPA: SDPA exports as ONNX `Attention`, which TensorRT cannot build in
    # fp32 and whose softmax precision is implicit. Matmuls in the compute dtype; the mask add and
    # softmax in fp32 (TensorRT is strongly typed: precision lives in the graph). GQA without
    # repeating KV: fold each KV head's query group into the row axis.
    q = qk[:, :, :heads].transpose(1, 2).reshape(batch, kv_heads, groups * seq, head_dim)
    # K @ q^T, not q @ K^T: CPU GEMMs pack their B operand per call, and K is the large one.
    scores = torch.matmul(present_key, q.transpose(2, 3)).transpose(2, 3)  # (batch, kv_heads, groups*seq, cache)
    scores = scores.float().view(batch, kv_heads, groups, seq, -1) * head_dim**-0.5
    probs = torch.softmax(scores + mask[:, :, None], dim=-1)  # fp32 mask add and softmax
    probs = probs.to(q.dtype).view(batch, kv_heads, groups * seq, -1)
    out = torch.matmul(probs, present_value)  # (batch, kv_heads, groups*seq, head_dim)
    return out.view(batch, heads, seq, head_dim).transpose(1, 2), present_key, present_value


@torch.library.custom_op("llamatrt::cached_attention", mutates_args=())
def cached_attention_op(
    qkv: torch.Tensor,
    position_ids: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    cache_position: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The functional form the exporter sees and lowers to GroupQueryAttention."""
    cos, sin = rope_from_tables((cos_table, sin_table), position_ids, qkv.dtype)
    out, key, value = reference_attention(qkv, cos, sin, past_key.clone(), past_value.clone(), cache_position, mask)
    return out.contiguous(), key, value


@cached_attention_op.register_fake
def _(qkv, position_ids, cos_table, sin_table, past_key, past_value, cache_position, mask):  # type: ignore[no-untyped-def]
    batch, seq, _, head_dim = qkv.shape
    heads = qkv.shape[2] - 2 * past_key.shape[1]
    return qkv.new_empty(batch, seq, heads, head_dim), torch.empty_like(past_key), torch.empty_like(past_value)
