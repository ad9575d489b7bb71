"""StaticLlama: the exportable model. Static shapes, explicit KV cache in and out.

forward(input_ids, position_ids, cache_position, attention_mask, *past) -> (logits, *present)
with past/present flat in graph order (key0, value0, key1, value1, ...), per DESIGN.md §1.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from llamatrt.base.config import LlamaConfig
from llamatrt.base.errors import CheckpointError
from llamatrt.models.layers import DecoderLayer, RMSNorm
from llamatrt.models.mask import causal_mask
from llamatrt.models.rope import Rotary, inv_freq_from_config, rope_cos_sin
from llamatrt.models.weights import fuse_projections


class _Backbone(nn.Module):
    """Holds parameters under transformers' `model.` prefix so HF state dicts load as they are."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class StaticLlama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", inv_freq_from_config(config), persistent=False)

    @property
    def head_weight(self) -> torch.Tensor:
        """(vocab, hidden): the tied embedding or the separate head."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # (batch, seq) int64
        position_ids: torch.Tensor,  # (batch, seq) int64
        cache_position: torch.Tensor,  # (batch, seq) int64: the slots each row writes
        attention_mask: torch.Tensor,  # (batch, max_cache_len) int64
        *past: torch.Tensor,  # 2 * num_layers of (batch, num_kv_heads, max_cache_len, head_dim)
        full_logits: bool = False,
        rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """-> (logits, *present). full_logits: logits of every position (batch, seq, vocab) instead of
        each row's last (batch, vocab). rope_tables (models.rope.rope_tables): under export, attention
        becomes one fused kernel that looks cos/sin up in them (models.attention); eager runs are the
        same either way."""
        x = self.model.embed_tokens(input_ids)  # (batch, seq, hidden)
        rotary = Rotary(*rope_cos_sin(self.inv_freq, position_ids, x.dtype), position_ids, rope_tables)
        mask = causal_mask(cache_position, attention_mask)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.layers):
            x, key, value = layer(x, rotary, mask, cache_position, past[2 * i], past[2 * i + 1])
            present += (key, value)
        if not full_logits:
            x = x[:, -1:]  # the loop only needs the next-token logits of each row
        x = self.model.norm(x)
        logits = torch.matmul(x, self.head_weight.t()).float()  # (batch, seq or 1, vocab)
        if not full_logits:
            logits = logits[:, 0]  # (batch, vocab)
        return (logits, *present)

    @classmethod
    def from_weights(cls, config: LlamaConfig, state_dict: Mapping[str, torch.Tensor]) -> StaticLlama:
        """Built around the given tensors: no random init and no second copy of the weights (a
        model built and then loaded holds ~2x the weights in resident memory, the allocator
        keeping the freed half)."""
        with torch.device("meta"):
            model = cls(config)
        model.load_weights(state_dict, assign=True)
        model.inv_freq = inv_freq_from_config(config)  # a buffer, not in state dicts
        return model

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], assign: bool = False) -> None:
        """Strict load of an HF-named (or already fused) state dict, with one-line errors naming
        the missing / unexpected / mis-shaped tensor. assign: take the tensors, do not copy."""
        own = self.state_dict()
        sd = fuse_projections(dict(state_dict), self.config.num_layers)
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # tied checkpoints may still store the copy
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own) - {k for k in sd if k.endswith("rotary_emb.inv_freq")})
        if missing:
            raise CheckpointError(
                f"checkpoint lacks tensor {missing[0]!r} ({len(missing)} missing); is it a complete Llama checkpoint?"
            )
        if unexpected:
            raise CheckpointError(
                f"checkpoint has unexpected tensor {unexpected[0]!r}; it does not match its config.json"
            )
        for name, tensor in own.items():
            if tuple(sd[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(sd[name].shape)}, config "
                    f"implies {tuple(tensor.shape)}; the checkpoint and config.json disagree"
                )
        self.load_state_dict({k: sd[k] for k in own}, strict=True, assign=assign)
