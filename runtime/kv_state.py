"""KVState: the B-row cache of a scheduler, and where each row's tokens go in it.

The cache is allocated once for the scheduler's life (no allocation per request). Row b of every
`[B, Hkv, C, D]` buffer is one contiguous block, so a batch-1 prefill runs on row b's views in place
while the other rows keep their contents; decode runs every row together, each at its own slot.

A row's prompt of n tokens lies at slots pad .. pad + n - 1 (positions 0 .. n - 1); slots below
`pad` are padding, hidden by `attention_mask`, which a static prefill graph wider than the prompt
needs. Stale contents of a reused row need no clearing: every slot is either masked or rewritten
before it becomes visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llamatrt.base.artifact import names
from llamatrt.base.artifact.feeds import graph_feeds, packed_feeds
from llamatrt.base.artifact.manifest import GraphSpec
from llamatrt.runtime.backend import Backend


@dataclass(frozen=True)
class PrefillPlan:
    pad: int  # padding slots before the prompt
    windows: tuple[tuple[int, int], ...]  # (first slot, tokens) of each prefill call, in order


def plan_prefill(length: int, sizes: list[int] | None, chunk: int, cached: int = 0) -> PrefillPlan:
    """The prefill calls for a prompt of `length` tokens whose first `cached` are in its row already
    (the prefix cache): the calls of the rest, placed after them; a static tail narrower than the
    smallest graph reaches back over cached slots (rewriting them alike) instead of padding. Call
    `usable_cached` first: it says how many cached tokens a plan can start after. `sizes`: the tokens per call the backend's
    static prefill graphs take, ascending (None: any number, up to `chunk` a call). Every plan's last
    call ends at the prompt's last token, whose logits the graph returns. With static sizes, full
    calls of the widest graph come first, then the tail that processes the fewest tokens (a prefill
    call's cost is mostly its tokens): its last window may start before the previous one ends, since
    rewriting a slot with the same token and context gives the same keys and values."""
    if cached:
        rest = plan_prefill(length - cached, sizes, chunk)
        shift = cached - rest.pad
        assert shift >= 0, "usable_cached leaves room for the tail"
        return PrefillPlan(0, tuple((shift + start, size) for start, size in rest.windows))
    if sizes is None:
        return PrefillPlan(0, tuple((s, min(chunk, length - s)) for s in range(0, length, chunk)))
    width = max(length, sizes[0])
    full = (width - 1) // sizes[-1] if width > sizes[-1] else 0  # whole widest calls, leaving a tail
    windows = [(k * sizes[-1], sizes[-1]) for k in range(full)]
    start = full * sizes[-1]
    for size in _cheapest_tail(width - start, sizes, width):
        windows.append((min(start, width - size), size))
        start += size
    return PrefillPlan(width - length, tuple(windows))


def usable_cached(length: int, cached: int, block: int, sizes: list[int] | None) -> int:
    """Of `cached` prefix tokens (whole blocks), how many a prompt of `length` tokens can take: at
    least one token is left to prefill (its logits give the first new token), and a static tail
    must fit behind the prompt's start."""
    if sizes is not None and length < sizes[0]:  # padded on the left: its slots are not its positions
        return 0
    return min(cached, (length - 1) // block * block)


def _cheapest_tail(remaining: int, sizes: list[int], width: int) -> list[int]:
    """Sizes of the calls covering the last `remaining` slots with the fewest tokens processed
    (fewest calls on a tie); the last call may reach back, but not before slot 0."""
    best: dict[int, tuple[int, int, list[int]]] = {0: (0, 0, [])}
    for r in range(1, remaining + 1):
        options = []
        for size in sizes:
            if size >= r and size <= width:
                options.append((size, 1, [size]))
            elif size < r:
                tokens, count, rest = best[r - size]
                options.append((size + tokens, count + 1, [size, *rest]))
        best[r] = min(options, key=lambda o: (o[0], o[1]))
    return best[remaining][2]


class KVState:
    def __init__(self, backend: Backend) -> None:
        manifest = backend.manifest
        self.device = backend.device
        self.batch = manifest.batch_size
        self.max_cache_len = manifest.max_cache_len
        self.present_names = names.cache_names(manifest.config.num_layers, "present")
        self.cache = backend.allocate_cache()  # once for the scheduler's life: (2 x layers, B, Hkv, C, D)
        self.buffers = list(self.cache.unbind(0))  # the graphs' past inputs, in graph order
        self.attention_mask = torch.ones(self.batch, self.max_cache_len, dtype=torch.long)
        # the views each call binds, made once: a backend that writes them in place hands the very
        # same objects back, so `take` checks identity instead of slicing 2 x layers tensors a step
        self._row_views = [[t[row : row + 1] for t in self.buffers] for row in range(self.batch)]
        self._prefix_views = {rows: [t[:rows] for t in self.buffers] for rows in range(1, self.batch)}
        self._prefix_views[self.batch] = self.buffers

    def reset_row(self, row: int, pad: int) -> None:
        """Row `row` starts a new sequence whose first `pad` slots are padding."""
        self.attention_mask[row].fill_(1)
        self.attention_mask[row, :pad] = 0

    def prefill_feeds(
        self, graph: GraphSpec, row: int, ids: torch.Tensor, positions: torch.Tensor, start: int
    ) -> dict[str, torch.Tensor]:
        """One batch-1 prefill call on row `row`'s views of the cache, writing slots start .. + len(ids) - 1."""
        views = self._row_views[row]  # (1, kv_heads, max_cache_len, head_dim): contiguous
        return graph_feeds(
            graph, ids[None], positions[None], start, self.attention_mask[row : row + 1], views, self.device
        )

    def decode_feeds(
        self, graph: GraphSpec, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One decode call of the first len(tokens) rows (all B, or a prefix of them on a graph with an
        open batch): row b feeds tokens[b] at RoPE position positions[b], written to slots[b]."""
        rows = len(tokens)
        views = self._prefix_views[rows]  # the first `rows` rows: a contiguous prefix
        return graph_feeds(
            graph, tokens[:, None], positions[:, None], slots, self.attention_mask[:rows], views, self.device
        )

    def packed_feeds(
        self,
        graph: GraphSpec,
        tokens: Sequence[torch.Tensor],
        positions: Sequence[torch.Tensor],
        slots: Sequence[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """One call of the first len(tokens) rows, row b bringing its own number of tokens (a graph
        that packs tokens): row b feeds tokens[b] at RoPE positions positions[b], written to slots[b]."""
        rows = len(tokens)
        return packed_feeds(
            graph, tokens, positions, slots, self.attention_mask[:rows], self._prefix_views[rows], self.device
        )

    def read_slots(self, row: int, start: int, size: int) -> torch.Tensor:
        """A copy of row `row`'s slots start .. start + size - 1 in every cache tensor, stacked:
        (2 * layers, kv_heads, size, head_dim), on the cache's device (what the prefix cache keeps).
        One copy of a strided view: it runs inside a step, between a running row's tokens."""
        return self.cache[:, row, :, start : start + size].clone(memory_format=torch.contiguous_format)

    def write_slots(self, row: int, blocks: Sequence[torch.Tensor]) -> None:
        """Row `row`'s first slots from `blocks` (each as `read_slots` gives), in order: one copy per
        block, in place (the backends' bound addresses stay the same)."""
        start = 0
        for block in blocks:
            size = block.shape[2]
            self.cache[:, row, :, start : start + size].copy_(block)
            start += size

    def take(self, outputs: dict[str, torch.Tensor], row: int | None = None, rows: int | None = None) -> None:
        """Present becomes past. Every backend here aliases present to the past buffer it was fed, so
        this copies nothing; a backend that returned new tensors would have them copied into the
        cache (row `row` of it, for a prefill on one row; its first `rows` rows, for a decode of them)."""
        targets = self._row_views[row] if row is not None else self._prefix_views[rows or self.batch]
        for target, name in zip(targets, self.present_names, strict=True):
            present = outputs[name]
            if present is not target and present.data_ptr() != target.data_ptr():
                target.copy_(present)
