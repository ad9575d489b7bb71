"""StaticLlama equals transformers.LlamaForCausalLM on the same weights (fp32, max abs <= 1e-4)."""

from __future__ import annotations

import torch

from llamatrt.models import StaticLlama, load_checkpoint
from llamatrt.models.kv_cache import empty_cache
from tests.conftest import tiny_hf_model

TOL = 1e-4
CACHE = 48


def run_static(
    model: StaticLlama,
    ids: torch.Tensor,
    cache: list[torch.Tensor],
    start: int,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    full_logits: bool = False,
):
    batch, seq = ids.shape
    cache_position = torch.arange(start, start + seq).expand(batch, seq)  # every row writes the same slots
    out = model(ids, positions, cache_position, attention_mask, *cache, full_logits=full_logits)
    return out[0], list(out[1:])


@torch.no_grad()
def test_prefill_and_decode_match_transformers(tiny_variant: str) -> None:
    hf = tiny_hf_model(tiny_variant)
    model = load_checkpoint(hf).build_model()
    prompt = torch.tensor([[5, 17, 42, 8, 77, 3, 9]])
    cache = empty_cache(model.config, 1, CACHE, torch.float32)
    mask = torch.ones(1, CACHE, dtype=torch.long)
    logits, cache = run_static(model, prompt, cache, 0, mask, torch.arange(7)[None])
    ref = hf(prompt, use_cache=True)
    assert (logits - ref.logits[:, -1]).abs().max() <= TOL
    past, ids, pos = ref.past_key_values, prompt, 7
    for _ in range(16):
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        logits, cache = run_static(model, nxt, cache, pos, mask, torch.tensor([[pos]]))
        ref = hf(nxt, past_key_values=past, use_cache=True)
        past, pos = ref.past_key_values, pos + 1
        assert (logits - ref.logits[:, -1]).abs().max() <= TOL
    full = hf(ids).logits[:, -1]  # no-cache reference for the last step too
    assert (logits - full).abs().max() <= TOL


@torch.no_grad()
def test_full_logits_match_transformers(tiny_variant: str) -> None:
    hf = tiny_hf_model(tiny_variant)
    model = load_checkpoint(hf).build_model()
    prompt = torch.tensor([[5, 17, 42, 8, 77, 3, 9, 11]])
    cache = empty_cache(model.config, 1, CACHE, torch.float32)
    logits, _ = run_static(
        model, prompt, cache, 0, torch.ones(1, CACHE, dtype=torch.long), torch.arange(8)[None], full_logits=True
    )
    assert (logits - hf(prompt).logits).abs().max() <= TOL


@torch.no_grad()
def test_left_padded_batch_equals_rows_alone() -> None:
    model = load_checkpoint(tiny_hf_model("gqa-llama3")).build_model()
    rows = [[5, 17, 42, 8, 77, 3, 9], [11, 12], [40, 41, 42, 43]]
    width = max(map(len, rows))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.ones(3, CACHE, dtype=torch.long)
    pos = torch.zeros(3, width, dtype=torch.long)
    for b, row in enumerate(rows):
        pad = width - len(row)
        ids[b, pad:] = torch.tensor(row)
        mask[b, :pad] = 0
        pos[b, pad:] = torch.arange(len(row))
    batch_logits, batch_cache = run_static(model, ids, empty_cache(model.config, 3, CACHE, torch.float32), 0, mask, pos)
    nxt = batch_logits.argmax(-1, keepdim=True)
    step_logits, _ = run_static(model, nxt, batch_cache, width, mask, pos[:, -1:] + 1)
    for b, row in enumerate(rows):
        one_mask = torch.ones(1, CACHE, dtype=torch.long)
        alone, cache = run_static(
            model,
            torch.tensor([row]),
            empty_cache(model.config, 1, CACHE, torch.float32),
            0,
            one_mask,
            torch.arange(len(row))[None],
        )
        assert (alone - batch_logits[b]).abs().max() <= TOL
        alone_step, _ = run_static(model, nxt[b : b + 1], cache, len(row), one_mask, torch.tensor([[len(row)]]))
        assert (alone_step - step_logits[b]).abs().max() <= TOL


@torch.no_grad()
def test_chunked_prefill_equals_one_call() -> None:
    model = load_checkpoint(tiny_hf_model("mha-untied")).build_model()
    prompt = torch.tensor([[5, 17, 42, 8, 77, 3, 9, 21, 22, 23]])
    mask = torch.ones(1, CACHE, dtype=torch.long)
    whole, _ = run_static(
        model, prompt, empty_cache(model.config, 1, CACHE, torch.float32), 0, mask, torch.arange(10)[None]
    )
    cache = empty_cache(model.config, 1, CACHE, torch.float32)
    for start in (0, 4, 8):
        chunk = prompt[:, start : start + 4]
        logits, cache = run_static(model, chunk, cache, start, mask, torch.arange(start, start + chunk.shape[1])[None])
    assert (logits - whole).abs().max() <= TOL


@torch.no_grad()
def test_fully_masked_row_gives_no_nan() -> None:
    model = load_checkpoint(tiny_hf_model("gqa-tied")).build_model()
    cache = empty_cache(model.config, 1, CACHE, torch.float32)
    logits, present = run_static(
        model,
        torch.tensor([[3, 4]]),
        cache,
        0,
        torch.zeros(1, CACHE, dtype=torch.long),
        torch.zeros(1, 2, dtype=torch.long),
    )
    assert torch.isfinite(logits).all() and all(torch.isfinite(t).all() for t in present)


@torch.no_grad()
def test_rows_at_their_own_slots_equal_each_row_alone() -> None:
    """cache_position is per row: one call with rows at different slots and positions gives each
    row what it gets alone (the in-flight batching contract)."""
    model = load_checkpoint(tiny_hf_model("gqa-llama3")).build_model()
    rows = [[5, 17, 42, 8, 77, 3, 9], [11, 12], [40, 41, 42, 43]]
    caches, logits = [], []
    for row in rows:  # each row prefilled alone
        out, cache = run_static(
            model,
            torch.tensor([row]),
            empty_cache(model.config, 1, CACHE, torch.float32),
            0,
            torch.ones(1, CACHE, dtype=torch.long),
            torch.arange(len(row))[None],
        )
        caches.append(cache)
        logits.append(out)
    batch_cache = [torch.cat(parts) for parts in zip(*caches, strict=True)]
    nxt = torch.cat([out.argmax(-1, keepdim=True) for out in logits])  # (3, 1)
    slots = torch.tensor([[len(r)] for r in rows])  # each row writes its own next slot
    step = model(nxt, slots, slots, torch.ones(3, CACHE, dtype=torch.long), *batch_cache)[0]
    for b in range(len(rows)):
        alone = model(
            nxt[b : b + 1], slots[b : b + 1], slots[b : b + 1], torch.ones(1, CACHE, dtype=torch.long), *caches[b]
        )[0]
        assert (alone - step[b]).abs().max() <= TOL
