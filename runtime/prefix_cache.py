"""The prefix cache: the keys and values of prompt blocks already computed, shared by every row.

Most prompts share a beginning with earlier ones (a system prompt, few-shot examples, a chat's
conversation so far). Their keys and values are the same in every row: a token's K/V depend only on
the tokens before it and its position, and a shared prefix sits at the same positions in every row
(slot = position once a row has no padding). So a row admitted with a cached prefix gets those slots
by a copy, one per block (runtime.kv_state), and prefills only the rest of its prompt.

As vLLM's automatic prefix caching: the cache holds blocks of `block_size` tokens, each under a key
that chains the key of the block before it with its own tokens (sha256), so a block is found only
after the very prefix it was computed with. Blocks live beside the backend's cache, on its device
(host memory on a CPU, device memory for TensorRT), within a byte budget; the least recently used
go first. Rows hold copies, never the blocks themselves, so any block may be evicted at any time.

Not bit-exact against prefilling the whole prompt, where the graph's arithmetic depends on how the
tokens are split into calls (ONNX Runtime's fused attention, a GEMM's blocking); within the fp32
tolerance, and greedy tokens equal in the tests.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ROOT = b""  # the key before a prompt's first block
DEFAULT_BLOCK_TOKENS = 16  # vLLM's block size; also SmolLM2's smallest static prefill
# What `load`, `generate`, `chat` and `serve` keep by default (0 turns it off). Held only as blocks
# are computed; SmolLM2 fp32 keeps about 46 KB a token, a Llama-3.2-1B-shaped model 64 KB.
DEFAULT_PREFIX_CACHE_MB = 512


def block_keys(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """The chained key of every full block of `tokens`: block i's key hashes block i-1's key and
    block i's tokens, so equal keys mean equal prefixes."""
    keys, parent = [], ROOT
    for start in range(0, len(tokens) - block_size + 1, block_size):
        digest = hashlib.sha256(parent)
        digest.update(b"".join(t.to_bytes(4, "little") for t in tokens[start : start + block_size]))
        parent = digest.digest()
        keys.append(parent)
    return keys


@dataclass
class PrefixCacheStats:
    """Counters since the cache was made, in tokens (vLLM's prefix_cache_queries / _hits)."""

    queries: int = 0  # prompt tokens looked up at admission
    hits: int = 0  # of those, the ones found cached
    evicted_blocks: int = 0


class PrefixCache:
    def __init__(self, budget_bytes: int, block_size: int = DEFAULT_BLOCK_TOKENS) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.budget_bytes, self.block_size = budget_bytes, block_size
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # key -> [2L, Hkv, block, D], oldest first
        self.bytes = 0
        self.stats = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def longest(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, are cached (a lookup that changes nothing)."""
        count = 0
        for key in keys:
            if key not in self.blocks:
                break
            count += 1
        return count

    def take(self, keys: Sequence[bytes], prompt_tokens: int) -> list[torch.Tensor]:
        """The cached blocks of `keys` from the first, counted as a query of `prompt_tokens` tokens;
        each becomes the most recently used."""
        found = [self.blocks[k] for k in keys[: self.longest(keys)]]
        for key in keys[: len(found)]:
            self.blocks.move_to_end(key)
        self.stats.queries += prompt_tokens
        self.stats.hits += len(found) * self.block_size
        return found

    def add(self, key: bytes, block: torch.Tensor) -> None:
        """Keep `block` (a copy the caller made) under `key`, evicting the least recently used blocks
        to stay within the budget; a block larger than the whole budget is not kept."""
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return
        size = block.numel() * block.element_size()
        if size > self.budget_bytes:
            return
        while self.bytes + size > self.budget_bytes:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.stats.evicted_blocks += 1
        self.blocks[key] = block
        self.bytes += size
