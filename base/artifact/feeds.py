"""The one builder of a graph call's inputs, and the check of them (DESIGN.md §1).

Everything that calls a graph builds its feeds here: the generation loop, the contract checks,
export validation, the graph-step benchmark and the tests. So the contract lives in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from llamatrt.base.artifact import names
from llamatrt.base.artifact.manifest import GraphSpec, TensorSpec
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
    """The packing inputs of rows whose first lengths[b] of `width` tokens are real (names.PACKING_INPUTS).
    The same few shapes recur every step (a decode step's rows of one token), so each is made once:
    the tensors are shared and read-only, as every input is to the backends, which copy or bind them."""
    return dict(_packing(tuple(int(n) for n in lengths), width, str(device)))


@functools.lru_cache(maxsize=256)
def _packing(lengths: tuple[int, ...], width: int, device: str) -> tuple[tuple[str, torch.Tensor], ...]:
    counts = torch.as_tensor(lengths, dtype=torch.long)  # (rows,)
    columns = torch.arange(width)
    real = columns[None, :] < counts[:, None]  # (rows, width)
    flat = (torch.arange(len(counts))[:, None] * width + columns).masked_select(real)
    firsts = counts.cumsum(0) - counts  # each row's first packed index
    padded = firsts[:, None] + torch.minimum(columns[None, :], counts[:, None] - 1)
    return (
        (names.PACKED_TOKENS, flat.to(device)),
        (names.PADDED_TOKENS, padded.to(device)),
        (names.QUERY_LENGTHS, counts.to(device)),
    )


def _add_cache(graph: GraphSpec, feeds: dict[str, torch.Tensor], cache: Cache) -> None:
    past = graph.cache_inputs
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
    for t in graph.step_inputs:
        _check_input(graph, t, feeds[t.name], sizes)
    if graph.cache_inputs:  # 2L buffers of one spec: resolved once, then compared as they are
        spec = graph.input(graph.cache_inputs[0])
        want, dtype = _resolved(spec, feeds[spec.name], sizes), _TORCH_DTYPES[spec.dtype]
        for name in graph.cache_inputs:
            value = feeds[name]
            if value.shape != want or value.dtype != dtype:
                _check_input(graph, graph.input(name), value, sizes)
    if graph.packs_tokens:
        _check_packing(graph, feeds)
    capacity = feeds[names.ATTENTION_MASK].shape[1]
    position = feeds[names.CACHE_POSITION]
    low, high = min(position[:, 0].tolist()), max(position[:, -1].tolist())
    if low < 0 or high >= capacity:
        raise InputError(
            f"cache_position {low}..{high} is outside the cache of {capacity} slots; the cache is full — "
            "re-export with a larger --max-seq-len"
        )


def _resolved(t: TensorSpec, value: torch.Tensor, sizes: dict[str, int]) -> tuple[int, ...]:
    """t's shape with its open dims as this call has them (the first input to bring a dim sets it)."""
    return tuple(
        sizes.setdefault(d, n) if isinstance(d, str) else d for d, n in zip(t.shape, value.shape, strict=False)
    )


def _check_input(graph: GraphSpec, t: TensorSpec, value: torch.Tensor, sizes: dict[str, int]) -> None:
    if value.shape != _resolved(t, value, sizes) or value.dtype != _TORCH_DTYPES[t.dtype]:
        bound = f" with {', '.join(f'{k}={v}' for k, v in sizes.items())} from the inputs before it" if sizes else ""
        raise InputError(
            f"{graph.name} input {t.name!r} is {tuple(value.shape)} {value.dtype}, the graph takes "
            f"{t.shape} {t.dtype}{bound}"
        )


def _check_packing(graph: GraphSpec, feeds: Mapping[str, torch.Tensor]) -> None:
    """The packing inputs agree with each other (what packing_feeds makes): a bad index would read
    another row's token."""
    lengths, packed = feeds[names.QUERY_LENGTHS].tolist(), feeds[names.PACKED_TOKENS].tolist()
    rows, width = feeds[names.INPUT_IDS].shape
    total = sum(lengths)
    if min(lengths) < 1 or max(lengths) > width or len(packed) != total:
        raise InputError(
            f"{graph.name}: query_lengths {lengths[:8]} and {len(packed)} packed tokens do not fit "
            f"{rows} rows of {width}; build the feeds with base.artifact.feeds.packed_feeds"
        )
    padded = feeds[names.PADDED_TOKENS].flatten().tolist()
    if min(packed) < 0 or max(packed) >= rows * width or min(padded) < 0 or max(padded) >= total:
        raise InputError(
            f"{graph.name}: a packing index is out of range; build the feeds with base.artifact.feeds.packed_feeds"
        )


def fixed_prompt(batch: int, seq: int, vocab: int) -> torch.Tensor:
    """Deterministic, varied token ids (no RNG): row b is a shifted arithmetic sequence."""
    ids = (torch.arange(seq)[None, :] * 7919 + torch.arange(batch)[:, None] * 104729 + 13) % vocab
    return ids.long()  # (batch, seq)
