"""The prefix cache: hash-chained blocks, LRU within a byte budget, and a request's tokens with a
cache hit equal to its tokens without the cache, on every backend (TensorRT against the fake module)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llamatrt
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.kv_state import KVState, PrefillPlan, plan_prefill, usable_cached
from llamatrt.runtime.prefix_cache import PrefixCache, block_keys
from llamatrt.runtime.registry import open_backend
from llamatrt.runtime.scheduler import REMEMBERED_BLOCKS_PER_STEP, Request, Scheduler
from llamatrt.tools.teacher_forcing import score

SHARED = [7, 19, 23, 4, 88, 61, 12, 30, 45, 9, 14, 77, 52, 3, 68, 21, 33]  # 17 tokens: 4 blocks of 4, then one


# --- the cache on plain values ----------------------------------------------------------------


def test_a_block_key_chains_everything_before_it() -> None:
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # full blocks only
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4) == a
    other_start = block_keys([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert other_start[0] != a[0] and other_start[1] != a[1]  # same second block, another prefix
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 0], 4)[0] == a[0]


def test_least_recently_used_blocks_go_first_within_the_budget() -> None:
    block = torch.zeros(2, 1, 4, 2)  # 64 bytes
    cache = PrefixCache(budget_bytes=3 * 64, block_size=4)
    keys = block_keys(list(range(20)), 4)  # 5 blocks
    for key in keys[:3]:
        cache.add(key, block.clone())
    assert cache.bytes == 192 and cache.longest(keys) == 3
    assert len(cache.take(keys[:1], prompt_tokens=20)) == 1  # keys[0] is now the most recent
    cache.add(keys[3], block.clone())  # evicts keys[1], the least recently used
    assert keys[1] not in cache.blocks and keys[0] in cache.blocks and cache.stats.evicted_blocks == 1
    assert cache.longest(keys) == 1  # a chain is found only up to its first missing block
    assert (cache.stats.queries, cache.stats.hits) == (20, 4)
    cache.add(keys[4], torch.zeros(2, 1, 4, 20))  # larger than the whole budget: not kept
    assert keys[4] not in cache.blocks and cache.bytes <= cache.budget_bytes
    assert not PrefixCache(0).enabled


def test_a_cached_prefix_leaves_a_token_to_prefill_and_no_padding() -> None:
    assert usable_cached(17, 16, 4, None) == 16
    assert usable_cached(16, 16, 4, None) == 12  # the last token's logits give the first new one
    assert usable_cached(12, 8, 4, [16, 128]) == 0  # padded on the left: slots are not positions
    assert usable_cached(40, 32, 16, [16, 128]) == 32
    # the rest after the cached slots; a static tail narrower than the smallest graph reaches back
    assert plan_prefill(40, [16, 128], 128, cached=32) == PrefillPlan(0, ((24, 16),))
    assert plan_prefill(150, [16, 128], 128, cached=128).windows == ((128, 16), (134, 16))
    assert plan_prefill(50, None, 8, cached=32).windows == ((32, 8), (40, 8), (48, 2))


# --- exactness on the tiny model, every backend that runs here ---------------------------------


def _alone(backend, prompts: list[list[int]], steps: int) -> list[list[int]]:
    return [Generator(backend).generate([p], max_new_tokens=steps)[0] for p in prompts]


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
def test_tokens_with_a_cache_hit_equal_tokens_without_it(tiny_artifact: Path, kind: str) -> None:
    """Prefixes of different lengths, ending on a block or mid-block, hit by later requests; two
    requests sharing a prefix admitted in the same step; all equal to each alone without a cache."""
    prompts = [
        [*SHARED, 5],  # warms the cache: blocks of SHARED[:16]
        [*SHARED, 40, 41, 42],  # hits 16 tokens, prefix ends mid-block
        [*SHARED[:9], 50, 51, 52, 53, 54, 55],  # hits the first 2 blocks only
        [*SHARED[:12], 60],  # hits 12
        [99 % 90, *SHARED[1:]],  # another first token: no hit
        [*SHARED, 70, 71],  # these two arrive together
        [*SHARED, 72],
    ]
    with open_backend(tiny_artifact, kind) as backend:
        expected = _alone(backend, prompts, 8)
        cache = PrefixCache(1 << 20, block_size=4)
        generator = Generator(backend, prefix_cache=cache)
        got = generator.generate(prompts[:1], max_new_tokens=8)
        for prompt in prompts[1:5]:
            got += generator.generate([prompt], max_new_tokens=8)
        got += generator.generate(prompts[5:], max_new_tokens=8)
    assert got == expected
    # hits: 16, 8, 12, 0, and 16 for both of the pair (the first one's blocks came from prompts[0])
    assert cache.stats.hits == 16 + 8 + 12 + 0 + 16 + 16
    assert cache.stats.queries == sum(map(len, prompts))


def test_logits_with_a_cache_hit_are_within_the_fp32_tolerance(tiny_artifact: Path) -> None:
    prompts, forced = [[*SHARED, 40, 41]], [[3, 4, 5, 6]]
    with open_backend(tiny_artifact, "onnxruntime") as backend:
        without = score(Generator(backend), prompts, forced)[0]
        generator = Generator(backend, prefix_cache=PrefixCache(1 << 20, block_size=4))
        score(generator, [[*SHARED, 1]], forced)  # computes the shared blocks
        with_hit = score(generator, prompts, forced)[0]
        assert generator.scheduler.prefix.stats.hits == 16
    assert torch.allclose(with_hit, without, atol=1e-4), (with_hit - without).abs().max()


def test_eviction_under_a_tiny_budget_keeps_answers_exact(tiny_artifact: Path) -> None:
    prompts = [[*SHARED, 5], [11, 12, 13, 14, 15, 16, 17, 18, 19], [*SHARED, 6], [*SHARED[:8], 2]]
    with open_backend(tiny_artifact, "onnxruntime") as backend:
        expected = _alone(backend, prompts, 6)
        config = backend.manifest.config
        one_block = 2 * config.num_layers * config.num_kv_heads * 4 * config.head_dim * 4  # fp32, 4 tokens
        cache = PrefixCache(2 * one_block, block_size=4)  # two blocks of keys and values
        generator = Generator(backend, prefix_cache=cache)
        got = [generator.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert got == expected
    assert cache.stats.evicted_blocks > 0 and cache.bytes <= cache.budget_bytes


def test_generated_tokens_are_kept_for_the_next_turn(tiny_artifact: Path) -> None:
    """A chat's next turn starts with the conversation so far, the answer included."""
    with open_backend(tiny_artifact, "onnxruntime") as backend:
        cache = PrefixCache(1 << 20, block_size=4)
        generator = Generator(backend, prefix_cache=cache)
        answer = generator.generate([SHARED[:6]], max_new_tokens=12)[0]
        turn = [*SHARED[:6], *answer, 8, 9]
        hits = cache.stats.hits
        again = generator.generate([turn], max_new_tokens=4)[0]
        assert cache.stats.hits - hits == (6 + 11) // 4 * 4  # the prompt and the answer's tokens fed back
        assert again == Generator(backend).generate([turn], max_new_tokens=4)[0]


def test_a_hit_is_copied_into_the_rows_own_slots_in_place(tmp_path: Path) -> None:
    """The TensorRT backend (fake module, fake CUDA): blocks are kept on the cache's device and a hit
    is a copy into the row's slots of the cache the engines are bound to; the bound addresses stay."""
    from tests.runtime.test_trt_backend import make_backend

    backend, _ = make_backend(tmp_path)  # B = 2, C = 16, prefill of 4 tokens a call
    cache = PrefixCache(1 << 20, block_size=4)
    scheduler = Scheduler(backend, prefix_cache=cache)
    pattern = torch.arange(16, dtype=torch.float32)[None, :, None]  # slot s holds s (the fake engines write nothing)
    for t in scheduler.kv.buffers:
        t.copy_(pattern.expand_as(t[0])[None].expand_as(t))
    addresses = [t.data_ptr() for t in scheduler.kv.buffers]
    first = scheduler.submit(Request(list(range(1, 10)), max_new_tokens=1, use_eos=False))
    list(scheduler.run([first]))
    assert len(cache.blocks) == 2 and all(b.device == backend.device for b in cache.blocks.values())
    for t in scheduler.kv.buffers:
        t.zero_()  # what the next row holds must come from the prefix cache
    second = scheduler.submit(Request([*range(1, 9), 12], max_new_tokens=1, use_eos=False))
    scheduler.step()  # admitted: 8 tokens copied in, one prefilled
    assert cache.stats.hits == 8
    for t in scheduler.kv.buffers:
        assert torch.equal(t[0, :, :8], pattern[:, :8].expand_as(t[0, :, :8]))
    assert [t.data_ptr() for t in scheduler.kv.buffers] == addresses
    assert second.done.is_set()  # admitted, the rest prefilled, its one token given, in that step


def test_a_block_is_every_layers_slots_in_graph_order(tiny_artifact: Path) -> None:
    """The cache is one tensor whose entries are the graphs' past inputs (each contiguous, bound by
    address), so a block of all layers is one strided copy each way."""
    with open_backend(tiny_artifact, "onnxruntime") as backend:
        kv = KVState(backend)
        kv.cache.copy_(torch.randn(kv.cache.shape, generator=torch.Generator().manual_seed(0)))
        assert all(t.is_contiguous() and t.untyped_storage().data_ptr() == kv.cache.data_ptr() for t in kv.buffers)
        block = kv.read_slots(1, 4, 4)
        assert block.is_contiguous() and torch.equal(block, torch.stack([t[1, :, 4:8] for t in kv.buffers]))
        kv.write_slots(0, [block, kv.read_slots(1, 8, 4)])
        for t in kv.buffers:
            assert torch.equal(t[0, :, :8], t[1, :, 4:12])
            assert not torch.equal(t[0, :, 8:12], t[1, :, 12:16])  # nothing past the blocks is written


def test_a_completed_prompts_blocks_reach_the_cache_a_few_a_step(tiny_artifact: Path) -> None:
    """Each block is a copy of every layer's slots: a step keeps at most REMEMBERED_BLOCKS_PER_STEP,
    so the step that completes a long prompt does not stall the running rows by the prompt's size.
    The rest follow in the next steps; a request that ends first has them all kept as it ends."""
    assert REMEMBERED_BLOCKS_PER_STEP == 4  # SHARED's 8 blocks of 2 below: two steps' worth
    with open_backend(tiny_artifact, "onnxruntime") as backend:
        cache = PrefixCache(1 << 20, block_size=2)
        scheduler = Scheduler(backend, prefix_cache=cache)
        handle = scheduler.submit(Request(SHARED, max_new_tokens=8, use_eos=False))
        kept = []  # blocks in the cache after each step from the one that gives the first token
        while not handle.done.is_set():
            if any(step.token_id is not None for step in scheduler.step()) or kept:
                kept.append(len(cache.blocks))
        assert kept[:3] == [4, 8, 8] and max(kept[:-1]) == 8
        assert kept[-1] == (len(SHARED) + 7) // 2  # at its end, the generated tokens fed back too

        ends_at_once = Scheduler(backend, prefix_cache=PrefixCache(1 << 20, block_size=2))
        list(ends_at_once.run([ends_at_once.submit(Request(SHARED[::-1], max_new_tokens=1, use_eos=False))]))
        assert len(ends_at_once.prefix.blocks) == len(SHARED) // 2  # type: ignore[union-attr]


def test_a_padded_row_does_not_hold_back_the_blocks_of_the_rows_after_it() -> None:
    """A prompt shorter than the smallest static prefill graph is left-padded: its slots are not its
    positions, so it shares nothing, and it must not take the step's blocks from the others."""
    from tests.runtime.fake_backend import ScriptedBackend, fake_manifest

    backend = ScriptedBackend(fake_manifest(batch=2, chunk=8, cache=24))  # prefill calls of 8 tokens
    cache = PrefixCache(1 << 20, block_size=2)
    scheduler = Scheduler(backend, prefix_cache=cache)
    padded = scheduler.submit(Request(list(range(20, 27)), max_new_tokens=12, use_eos=False))  # 3 blocks' worth
    scheduler.step()  # the oldest row: its 7-token prompt is in, behind a padding slot
    after = scheduler.submit(Request(list(range(1, 13)), max_new_tokens=10, use_eos=False))
    while after.events.empty():  # until its first token: its 12-token prompt is in
        scheduler.step()
    scheduler.step()
    assert not padded.done.is_set() and not after.done.is_set()
    assert len(cache.blocks) == 6  # the later row's six blocks, in the step that completed it and the next


# --- where the loop runs: load(), generate, chat, the server -----------------------------------


def test_load_reuses_a_prompt_and_says_how_many_tokens_it_took(tiny_artifact: Path) -> None:
    prompt = " ".join(f"w{i}" for i in range(5, 30))
    with llamatrt.load(tiny_artifact, verify=False) as llm:
        first, second = (llm.generate(prompt, max_new_tokens=5)[0] for _ in range(2))
    with llamatrt.load(tiny_artifact, verify=False, prefix_cache_mb=0) as llm:
        off = llm.generate(prompt, max_new_tokens=5)[0]
    assert first.cached_tokens == 0 and second.cached_tokens >= 16 and off.cached_tokens == 0
    assert first.token_ids == second.token_ids == off.token_ids
