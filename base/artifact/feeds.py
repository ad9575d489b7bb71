"""The one builder of a graph call's inputs, and the check of them (DESIGN.md §1).

Everything that calls a graph builds its feeds here: the generation loop, the contract checks,
export validation, the graph-step benchmark and the tests. So the contract lives in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from llamatrt.base.artifact import names
from llamatrt.base.artifact.manifest import GraphSpec
from llamatrt.base.artifact.precision import TENSOR_DTYPES, torch_dtype
from llamatrt.base.errors import InputError

_TORCH_DTYPES = {name: torch_dtype(name) for name in TENSOR_DTYPES}  # manifest dtypes are checked by the schema
Cache = Sequence[torch.Tensor]  # flat past buffers (key0, value0, ...), each (batch, kv_heads, max_cache_len, head_dim)


def graph_feeds(
    graph: GraphSpec,
    input_ids: torch.Tensor,  # (batch, seq) int64
    position_ids: torch.Tensor,  # (batch, seq) int64: RoPE positions
    starts: int | Sequence[int] | torch.Tensor,  # row b's seq new tokens land at slots starts[b] .. + seq - 1
    attention_mask: torch.Tensor,  # (batch, max_cache_len) int64: 1 where a slot holds a real token
    cache: Cache,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Feeds of one call of `graph`; the cache buffers are passed as they are (backends alias them).
    `starts` may be one slot for every row."""
    batch, seq = input_ids.shape
    first = torch.as_tensor(starts, dtype=torch.long).expand(batch)  # (batch,)
    feeds = {
        names.INPUT_IDS: input_ids.to(device),
        names.POSITION_IDS: position_ids.to(device),
        names.CACHE_POSITION: (first[:, None] + torch.arange(seq)).to(device),  # (batch, seq)
        names.ATTENTION_MASK: attention_mask.to(device),
    }
    past = [t.name for t in graph.inputs[len(names.SMALL_INPUTS) :]]
    if len(past) != len(cache):
        raise InputError(f"{graph.name} takes {len(past)} cache tensors, {len(cache)} were given")
    feeds.update(zip(past, cache, strict=True))
    return feeds


def check_feeds(graph: GraphSpec, feeds: Mapping[str, torch.Tensor]) -> None:
    """One-line errors that name the tensor, instead of an ONNX Runtime / TensorRT traceback."""
    expected = graph.input_names
    if feeds.keys() != expected:
        missing, extra = sorted(expected - set(feeds)), sorted(set(feeds) - expected)
        raise InputError(
            f"{graph.name} feeds: missing {missing[:3]}, unexpected {extra[:3]}; feed exactly the graph's inputs "
            "named in manifest.json"
        )
    sizes: dict[str, int] = {}  # what each open dim ("batch", "tokens") is in this call
    wants: dict[tuple[int | str, ...], tuple[int, ...]] = {}  # each spec shape resolved once (the cache's 2L share one)
    for t in graph.inputs:
        value = feeds[t.name]
        want = wants.get(t.shape)
        if want is None:
            want = wants[t.shape] = tuple(
                sizes.setdefault(d, n) if isinstance(d, str) else d for d, n in zip(t.shape, value.shape, strict=False)
            )
        if value.shape != want or value.dtype != _TORCH_DTYPES[t.dtype]:
            bound = (
                f" with {', '.join(f'{k}={v}' for k, v in sizes.items())} from the inputs before it" if sizes else ""
            )
            raise InputError(
                f"{graph.name} input {t.name!r} is {tuple(value.shape)} {value.dtype}, the graph takes "
                f"{t.shape} {t.dtype}{bound}"
            )
    capacity = feeds[names.ATTENTION_MASK].shape[1]
    position = feeds[names.CACHE_POSITION]
    low, high = int(position[:, 0].min()), int(position[:, -1].max())
    if low < 0 or high >= capacity:
        raise InputError(
            f"cache_position {low}..{high} is outside the cache of {capacity} slots; the cache is full — "
            "re-export with a larger --max-seq-len"
        )


def fixed_prompt(batch: int, seq: int, vocab: int) -> torch.Tensor:
    """Deterministic, varied token ids (no RNG): row b is a shifted arithmetic sequence."""
    ids = (torch.arange(seq)[None, :] * 7919 + torch.arange(batch)[:, None] * 104729 + 13) % vocab
    return ids.long()  # (batch, seq)
