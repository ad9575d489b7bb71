"""Rotary position embedding: inverse frequencies (with linear / llama3 scaling) and the rotation.

The cos/sin are computed from `position_ids` inside the graph (one multiply per call), the way
transformers' LlamaRotaryEmbedding does, so positions are exact for any row and any padding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from llamatrt.base.config import LlamaConfig


def inv_freq_from_config(config: LlamaConfig) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, scaled as the config says."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    return _llama3_scaled(
        inv_freq,
        scaling.factor,
        scaling.low_freq_factor,
        scaling.high_freq_factor,
        scaling.original_max_position_embeddings,
    )


def _llama3_scaled(
    inv_freq: torch.Tensor, factor: float, low: float, high: float, old_context_len: int
) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, a smooth ramp between."""
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary(NamedTuple):
    """What attention needs to rotate q and k: cos/sin per position for the explicit rotation, or,
    for a fused kernel that looks positions up itself, the positions and cos/sin tables."""

    cos: torch.Tensor  # (batch, seq, 1, head_dim)
    sin: torch.Tensor
    position_ids: torch.Tensor  # (batch, seq) int64
    tables: tuple[torch.Tensor, torch.Tensor] | None = None  # rope_tables(); set: fused attention


def rope_tables(inv_freq: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (positions, head_dim // 2) fp32: row p holds the angles rope_cos_sin computes for
    position p (the same fp32 products, so the same values)."""
    angles = torch.arange(positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rope_from_tables(
    tables: tuple[torch.Tensor, torch.Tensor], position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_cos_sin's (batch, seq, 1, head_dim) cos, sin, looked up in rope_tables()."""
    cos, sin = (torch.cat((t[position_ids], t[position_ids]), dim=-1).to(dtype)[:, :, None] for t in tables)
    return cos, sin


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (batch, seq, 1, head_dim), computed in fp32 then cast to `dtype`."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (batch, seq, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (batch, seq, head_dim)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, seq, heads, head_dim) by the half-split convention HF checkpoints use."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
