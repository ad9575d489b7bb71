"""The attention mask, derived from `cache_position` in one place.

Slot j of the cache is visible to query s of row b iff j <= cache_position[b, s] and
attention_mask[b, j] == 1 (transformers' `_prepare_4d_causal_attention_mask_with_cache_position`,
with a position per row so rows at different places in their sequences share one call).
"""

from __future__ import annotations

import torch

# Large but finite: a fully masked row softmaxes to a uniform row instead of NaN, and adding any
# real score to it stays finite in fp32 (finfo(fp32).min + negative score would overflow to -inf).
MASK_VALUE = -1.0e9


def causal_mask(cache_position: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Additive fp32 mask (batch, 1, seq, max_cache_len): 0 where visible, MASK_VALUE elsewhere."""
    max_cache_len = attention_mask.shape[-1]
    slots = torch.arange(max_cache_len, device=cache_position.device)  # (max_cache_len,)
    causal = slots[None, None, :] <= cache_position[:, :, None]  # (batch, seq, max_cache_len)
    visible = causal & (attention_mask[:, None, :] != 0)  # (batch, seq, max_cache_len)
    zero = torch.zeros((), dtype=torch.float32, device=cache_position.device)
    masked = torch.full((), MASK_VALUE, dtype=torch.float32, device=cache_position.device)
    return torch.where(visible, zero, masked)[:, None]  # (batch, 1, seq, max_cache_len)
