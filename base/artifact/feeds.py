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
    _add_cache(graph, feeds, cache)
    if graph.packs_tokens:  # every row's tokens are real
        feeds.update(packing_feeds([seq] * batch, seq, device))
    return feeds


def packed_feeds(
    graph: GraphSpec,
    input_ids: Sequence[torch.Tensor],  # row b's new tokens (n_b,) int64, n_b >= 1
    position_ids: Sequence[torch.Tensor],  # (n_b,) int64: their RoPE positions
    slots: Sequence[torch.Tensor],  # (n_b,) int64: the consecutive slots they are written to
    attention_mask: torch.Tensor,  # (rows, max_cache_len) int64
    cache: Cache,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Feeds of one call whose rows bring different numbers of tokens (a graph that packs tokens):
    decode rows of one token beside a prompt's slice. Each row is right-padded to the widest with
    its own last token, position and slot, so its last column says where its row ends (the attention
    writes row b's n_b tokens just before it) and the logits are its last real token's."""
    if not graph.packs_tokens:
        raise InputError(f"{graph.name} takes rows of one token count; re-export to run rows of different counts")
    lengths = [len(ids) for ids in input_ids]
    width = max(lengths)

    def padded(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.cat([p, p[-1:].expand(width - len(p))]) for p in parts]).to(device)

    feeds = {
        names.INPUT_IDS: padded(input_ids),
        names.POSITION_IDS: padded(position_ids),
        names.CACHE_POSITION: padded(slots),
        names.ATTENTION_MASK: attention_mask.to(device),
    }
    _add_cache(graph, feeds, cache)
    feeds.update(packing_feeds(lengths, width, device))
    return feeds


def packing_feeds(lengths: Sequence[int], width: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The packing inputs of rows whose first lengths[b] of `width` tokens are real (names.PACKING_INPUTS)."""
    counts = torch.as_tensor(lengths, dtype=torch.long)  # (rows,)
    columns = torch.arange(width)
    real = columns[None, :] < counts[:, None]  # (rows, width)
    flat = (torch.arange(len(counts))[:, None] * width + columns).masked_select(real)
    firsts = counts.cumsum(0) - counts  # each row's first packed index
    padded = firsts[:, None] + torch.minimum(columns[None, :], counts[:, None] - 1)
    return {
        names.PACKED_TOKENS: flat.to(device),
        names.PADDED_TOKENS: padded.to(device),
        names.QUERY_LENGTHS: counts.to(device),
    }


def _add_cache(graph: GraphSpec, feeds: dict[str, torch.Tensor], cache: Cache) -> None:
    past = [t.name for t in graph.inputs if names.is_cache(t.name)]
    if len(past) != len(cache):
        raise InputError(f"{graph.name} takes {len(past)} cache tensors, {len(cache)} were given")
    feeds.update(zip(past, cache, strict=True))


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
    if graph.packs_tokens:
        _check_packing(graph, feeds)
    capacity = feeds[names.ATTENTION_MASK].shape[1]
    position = feeds[names.CACHE_POSITION]
    low, high = int(position[:, 0].min()), int(position[:, -1].max())
    if low < 0 or high >= capacity:
        raise InputError(
            f"cache_position {low}..{high} is outside the cache of {capacity} slots; the cache is full — "
            "re-export with a larger --max-seq-len"
        )


def _check_packing(graph: GraphSpec, feeds: Mapping[str, torch.Tensor]) -> None:
    """The packing inputs agree with each other (what packing_feeds makes): a bad index would read
    another row's token."""
    lengths, packed = feeds[names.QUERY_LENGTHS], feeds[names.PACKED_TOKENS]
    rows, width = feeds[names.INPUT_IDS].shape
    total = int(lengths.sum())
    if int(lengths.min()) < 1 or int(lengths.max()) > width or len(packed) != total:
        raise InputError(
            f"{graph.name}: query_lengths {lengths.tolist()[:8]} and {len(packed)} packed tokens do not fit "
            f"{rows} rows of {width}; build the feeds with base.artifact.feeds.packed_feeds"
        )
    padded = feeds[names.PADDED_TOKENS]
    if (
        int(packed.min()) < 0
        or int(packed.max()) >= rows * width
        or int(padded.min()) < 0
        or int(padded.max()) >= total
    ):
        raise InputError(
            f"{graph.name}: a packing index is out of range; build the feeds with base.artifact.feeds.packed_feeds"
        )


def fixed_prompt(batch: int, seq: int, vocab: int) -> torch.Tensor:
    """Deterministic, varied token ids (no RNG): row b is a shifted arithmetic sequence."""
    ids = (torch.arange(seq)[None, :] * 7919 + torch.arange(batch)[:, None] * 104729 + 13) % vocab
    return ids.long()  # (batch, seq)
