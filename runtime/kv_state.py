"""KVState: the cache buffers of one generation and the slot bookkeeping around them.

Slots are shared by all rows (one `cache_position` per call); each row keeps its own RoPE position,
and `attention_mask` hides its left padding. Present becomes past by taking the outputs' buffers
(which backends alias to the inputs), never by copying.
"""

from __future__ import annotations

import torch

from llamatrt.models.kv_cache import cache_names
from llamatrt.runtime.backend import Backend


class KVState:
    def __init__(self, backend: Backend) -> None:
        manifest = backend.manifest
        self.max_cache_len = manifest.max_cache_len
        self.past_names = cache_names(manifest.config.num_layers, "past")
        self.present_names = cache_names(manifest.config.num_layers, "present")
        self.buffers = backend.allocate_cache()  # once per generation
        self.attention_mask = torch.ones(manifest.batch_size, self.max_cache_len, dtype=torch.long)
        self.next_slot = 0

    def start(self, padding: list[int]) -> None:
        """A new batch: row b's first padding[b] slots are padding. Stale cache contents need no
        clearing: every slot is either masked here or rewritten before it becomes visible."""
        self.attention_mask.fill_(1)
        for row, pad in enumerate(padding):
            self.attention_mask[row, :pad] = 0
        self.next_slot = 0

    @property
    def free_slots(self) -> int:
        return self.max_cache_len - self.next_slot

    def feeds(self, device: torch.device) -> dict[str, torch.Tensor]:
        feeds = dict(zip(self.past_names, self.buffers, strict=True))
        feeds["attention_mask"] = self.attention_mask.to(device)
        return feeds

    def update(self, outputs: dict[str, torch.Tensor], next_slot: int) -> None:
        self.buffers = [outputs[name] for name in self.present_names]
        self.next_slot = next_slot
