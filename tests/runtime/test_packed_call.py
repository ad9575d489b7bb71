"""ONNX Runtime's graph packs tokens (exporter.ort_packing): rows of different token counts share one
call, and each row gets what it gets in a call of its own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llamatrt.base.artifact import names
from llamatrt.base.artifact.feeds import graph_feeds, packed_feeds
from llamatrt.base.artifact.reader import read_manifest
from llamatrt.base.errors import InputError
from llamatrt.runtime import scheduler as loop
from llamatrt.runtime.ort_backend import OrtBackend
from llamatrt.runtime.prefill_cost import CallCost
from llamatrt.runtime.scheduler import Request, Scheduler


def _prompt(length: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed))


def test_decode_rows_and_a_prompt_slice_in_one_call_equal_their_own_calls(tiny_artifact) -> None:
    manifest = read_manifest(tiny_artifact)
    vocab, capacity = manifest.config.vocab_size, manifest.max_cache_len
    with OrtBackend(tiny_artifact, manifest, attention="onnxruntime") as backend:
        graph = backend.graph("decode")
        assert graph.packs_tokens
        mask = torch.ones(3, capacity, dtype=torch.long)

        def prefilled() -> list[torch.Tensor]:
            """Rows 0 and 1 hold prompts of 5 and 7 tokens; row 2 the first 3 of a prompt of 9."""
            cache = backend.allocate_cache()
            for row, (length, seed) in enumerate([(5, 1), (7, 2), (3, 3)]):
                ids = _prompt(length, seed, vocab)
                views = [t[row : row + 1] for t in cache]
                feeds = graph_feeds(graph, ids[None], torch.arange(length)[None], 0, mask[row : row + 1], views)
                backend.run(graph.name, feeds)
            return cache

        rest = _prompt(9, 3, vocab)[3:7]  # row 2's next 4 tokens, at slots 3..6
        tokens, slots = torch.tensor([11, 12]), torch.tensor([5, 7])  # rows 0 and 1 decode one token each

        # one call: rows 0 and 1 decode, row 2 prefills 4 tokens
        together = prefilled()
        feeds = packed_feeds(
            graph,
            [tokens[:1], tokens[1:], rest],
            [slots[:1], slots[1:], torch.arange(3, 7)],
            [slots[:1], slots[1:], torch.arange(3, 7)],
            mask,
            together,
        )
        assert feeds[names.QUERY_LENGTHS].tolist() == [1, 1, 4]
        joint = backend.run(graph.name, feeds)[names.LOGITS].clone()

        # their own calls: a decode of rows 0 and 1, a prefill of row 2
        apart = prefilled()
        decode = graph_feeds(graph, tokens[:, None], slots[:, None], slots, mask[:2], [t[:2] for t in apart])
        decoded = backend.run(graph.name, decode)[names.LOGITS].clone()
        prefill = graph_feeds(graph, rest[None], torch.arange(3, 7)[None], 3, mask[2:], [t[2:] for t in apart])
        prefilled_logits = backend.run(graph.name, prefill)[names.LOGITS].clone()

    torch.testing.assert_close(joint[:2], decoded, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(joint[2:], prefilled_logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(together, apart, strict=True):  # every slot written alike, none written past a row's end
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_packing_inputs_that_disagree_are_refused_with_one_line(tiny_artifact) -> None:
    manifest = read_manifest(tiny_artifact)
    with OrtBackend(tiny_artifact, manifest, attention="onnxruntime") as backend:
        graph = backend.graph("decode")
        cache = [t[:2] for t in backend.allocate_cache()]
        ids = [torch.tensor([5]), torch.tensor([6, 7, 8])]
        mask = torch.ones(2, manifest.max_cache_len, dtype=torch.long)
        feeds = packed_feeds(graph, ids, ids, [torch.tensor([0]), torch.arange(3)], mask, cache)
        feeds[names.QUERY_LENGTHS] = torch.tensor([3, 3])  # says 6 real tokens, 4 are packed
        with pytest.raises(InputError, match="query_lengths"):
            backend.run(graph.name, feeds)


def test_what_prompt_tokens_add_is_measured_beside_a_decode_call_of_as_many_rows(tiny_artifact, monkeypatch) -> None:
    """The budget sizes a packed call's prompt tokens from what each added to a decode call. A call
    with a row still prefilling has one row fewer decoding than the steps around it: measured against
    their average decode step, its tokens read cheap and the budget let the step run past its share.
    Here calls cost 10 ms, 5 ms a row and 1 ms a token beyond one a row, on a scripted clock."""
    clock = [0.0]
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    manifest = read_manifest(tiny_artifact)
    with OrtBackend(tiny_artifact, manifest, attention="onnxruntime") as backend:
        scheduler = Scheduler(backend)
        assert scheduler.packed_graph is not None
        run = backend.run

        def timed(graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            rows = feeds[names.INPUT_IDS].shape[0]
            packed = feeds.get(names.PACKED_TOKENS)
            tokens = packed.numel() if packed is not None else feeds[names.INPUT_IDS].numel()
            clock[0] += 0.010 + 0.005 * rows + 0.001 * (tokens - rows)
            return run(graph, feeds)

        monkeypatch.setattr(backend, "run", timed)
        vocab = manifest.config.vocab_size
        long = scheduler.submit(Request(_prompt(3, 1, vocab).tolist(), max_new_tokens=30, use_eos=False))
        short = scheduler.submit(Request(_prompt(3, 2, vocab).tolist(), max_new_tokens=4, use_eos=False))
        while not short.done.is_set():  # rows 0 and 1 decode: 20 ms a call of two rows, then row 0 alone
            scheduler.step()
        for _ in range(3):
            scheduler.step()
        assert scheduler.added_cost.fit() is None
        late = scheduler.submit(Request(_prompt(40, 3, vocab).tolist(), max_new_tokens=2, use_eos=False))
        while not late.done.is_set():  # row 1's prompt rides in row 0's decode calls, a slice a step
            scheduler.step()
        assert not long.done.is_set() and scheduler.added_cost.calls, "the prompt's slices rode in row 0's calls"
        assert scheduler.added_cost.fit() == CallCost(0.0, pytest.approx(0.001))
