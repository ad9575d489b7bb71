"""Llama building blocks: RMSNorm (fp32 statistics), GQA attention over a static cache, SwiGLU MLP.

Parameter names are transformers' (`o_proj`, `down_proj`, `input_layernorm`, ...) except two fused
projections: `qkv_proj` = [q_proj; k_proj; v_proj] and `gate_up_proj` = [gate_proj; up_proj]
(concatenated along the output axis by models.weights.fuse_projections at load). A batch-1 decode
step is a chain of GEMVs; two fused GEMMs per layer instead of five cut three kernel launches per
layer and let RoPE rotate queries and keys in one go.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from llamatrt.base.config import LlamaConfig
from llamatrt.models.attention import cached_attention
from llamatrt.models.rope import Rotary


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One op: exports as ONNX RMSNormalization (opset 23), 1 node instead of 7. Statistics in fp32
        # whatever the compute dtype (fp16 squares overflow past ~256); the casts vanish in fp32 graphs.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.qkv_proj = nn.Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(
        self,
        x: torch.Tensor,  # (batch, seq, hidden)
        rotary: Rotary,
        mask: torch.Tensor,  # (batch, 1, seq, max_cache_len) fp32 additive
        cache_position: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, seq, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        out, present_key, present_value = cached_attention(qkv, rotary, past_key, past_value, cache_position, mask)
        return self.o_proj(out.reshape(batch, seq, -1)), present_key, present_value


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config
        self.intermediate_size = c.intermediate_size
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        # Two slices, not split(): ONNX Runtime merges them into a Split it runs faster than the one
        # split() exports (its profiler shows it; README, "What makes the ONNX Runtime CPU decode fast").
        gate, up = gate_up[..., : self.intermediate_size], gate_up[..., self.intermediate_size :]
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rotary: Rotary,
        mask: torch.Tensor,
        cache_position: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, present_key, present_value = self.self_attn(
            self.input_layernorm(x), rotary, mask, cache_position, past_key, past_value
        )
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present_key, present_value
