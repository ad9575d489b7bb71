"""KVState: the cache buffers of one generation and the slot bookkeeping around them.

Slots are shared by all rows (one `cache_position` per call); each row keeps its own RoPE position,
and `attention_mask` hides its left padding. Present becomes past by taking the outputs' buffers
(which backends alias to the inputs), never by copying.
"""

from __future__ import annotations

import torch

from llamatrt.artifact import names
from llamatrt.artifact.feeds import graph_feeds
from llamatrt.artifact.manifest import GraphSpec
from llamatrt.runtime.backend import Backend


class KVState:
    def __init__(self, backend: Backend) -> None:
        manifest = backend.manifest
        self.device = backend.device
        self.max_cache_len = manifest.max_cache_len
        self.present_names = names.cache_names(manifest.config.num_layers, "present")
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

    def feeds(
        self, graph: GraphSpec, input_ids: torch.Tensor, position_ids: torch.Tensor, start: int
    ) -> dict[str, torch.Tensor]:
        """The feeds of one call of `graph` writing from slot `start`, over this state's cache."""
        return graph_feeds(graph, input_ids, position_ids, start, self.attention_mask, self.buffers, self.device)

    def update(self, outputs: dict[str, torch.Tensor], next_slot: int) -> None:
        self.buffers = [outputs[name] for name in self.present_names]
        self.next_slot = next_slot
