"""The loop, tested on a scripted backend: chunking, padding, batching, stop rules, seeds."""

from __future__ import annotations

import pytest
import torch

from llamatrt.errors import InputError
from llamatrt.runtime.generator import Generator, prefill_windows
from llamatrt.runtime.sampling import SamplingParams
from tests.runtime.fake_backend import ScriptedBackend, fake_manifest


def steps_of(gen: Generator, prompts, **kw):
    return list(gen.stream(prompts, **kw))


def test_prefill_windows_cover_prompt_and_end_on_it() -> None:
    assert prefill_windows(4, 4) == [0]
    assert prefill_windows(10, 4) == [0, 4, 6]
    assert prefill_windows(12, 4) == [0, 4, 8]


def test_chunked_prefill_then_decode_slots() -> None:
    backend = ScriptedBackend(fake_manifest(chunk=4))
    tokens = Generator(backend).generate([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], max_new_tokens=3)
    assert tokens == [[11, 12, 13]]
    starts = [(c["graph"], int(c["cache_position"][0])) for c in backend.calls]
    assert starts == [("prefill", 0), ("prefill", 4), ("prefill", 6), ("decode", 10), ("decode", 11)]
    assert backend.calls[2]["input_ids"].tolist() == [[7, 8, 9, 10]]
    assert backend.calls[3]["position_ids"].tolist() == [[10]]


def test_left_padding_positions_and_mask_and_batch_equals_alone() -> None:
    prompts = [[5, 6, 7, 8, 9, 10], [3], [20, 21]]
    backend = ScriptedBackend(fake_manifest(batch=3, chunk=4))
    batched = Generator(backend).generate(prompts, max_new_tokens=4)
    first = backend.calls[0]
    assert first["attention_mask"][1, :6].tolist() == [0, 0, 0, 0, 0, 1]
    assert first["attention_mask"][2, :6].tolist() == [0, 0, 0, 0, 1, 1]
    last_prefill = [c for c in backend.calls if c["graph"] == "prefill"][-1]
    assert last_prefill["position_ids"][:, -1].tolist() == [5, 0, 1]
    decode = next(c for c in backend.calls if c["graph"] == "decode")
    assert decode["position_ids"][:, 0].tolist() == [6, 1, 2]
    alone = [Generator(ScriptedBackend(fake_manifest(chunk=4))).generate([p], max_new_tokens=4)[0] for p in prompts]
    assert batched == alone == [[11, 12, 13, 14], [4, 5, 6, 7], [22, 23, 24, 25]]


def test_more_prompts_than_batch_run_in_successive_batches() -> None:
    backend = ScriptedBackend(fake_manifest(batch=2, chunk=4))
    out = Generator(backend).generate([[1], [2], [3]], max_new_tokens=2)
    assert out == [[2, 3], [3, 4], [4, 5]]
    assert sum(c["graph"] == "prefill" for c in backend.calls) == 2


def test_stop_ids_are_not_emitted_and_several_are_allowed() -> None:
    gen = Generator(ScriptedBackend(fake_manifest(batch=2)), stop_ids=[8, 25])
    steps = steps_of(gen, [[5], [22]], max_new_tokens=10)
    assert gen.generate([[5], [22]], max_new_tokens=10) == [[6, 7], [23, 24]]
    finals = {s.index: s for s in steps if s.finish_reason}
    assert finals[0].finish_reason == finals[1].finish_reason == "stop" and finals[0].token_id is None


def test_stop_string_ends_the_row() -> None:
    gen = Generator(ScriptedBackend(fake_manifest()), detokenize=lambda ids: " ".join(map(str, ids)))
    steps = steps_of(gen, [[5]], max_new_tokens=10, stop_strings=["8 9"])
    assert [s.token_id for s in steps] == [6, 7, 8, 9]
    assert steps[-1].finish_reason == "stop"


def test_max_new_tokens_gives_length() -> None:
    steps = steps_of(Generator(ScriptedBackend(fake_manifest())), [[1]], max_new_tokens=3)
    assert [s.finish_reason for s in steps] == [None, None, "length"]


def test_full_cache_gives_length_and_never_overflows() -> None:
    backend = ScriptedBackend(fake_manifest(chunk=4, cache=12))
    steps = steps_of(Generator(backend), [list(range(1, 11))], max_new_tokens=50)
    assert [s.token_id for s in steps] == [11, 12, 13] and steps[-1].finish_reason == "length"
    assert max(int(c["cache_position"][-1]) for c in backend.calls) == 11  # the last slot, written once
    exactly_full = steps_of(
        Generator(ScriptedBackend(fake_manifest(chunk=4, cache=12))), [list(range(12))], max_new_tokens=5
    )
    assert [(s.token_id, s.finish_reason) for s in exactly_full] == [(12, "length")]


def test_seeded_sampling_is_reproducible_per_prompt() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)
    run = lambda batch, prompts: Generator(ScriptedBackend(fake_manifest(batch=batch), flat=True)).generate(  # noqa: E731
        prompts, max_new_tokens=8, sampling=params
    )
    a, b = run(1, [[1]]), run(1, [[1]])
    assert a == b
    assert run(2, [[1], [2]])[0] == a[0]  # same seed, same tokens alone or in a batch
    other = Generator(ScriptedBackend(fake_manifest(), flat=True)).generate(
        [[1]], max_new_tokens=8, sampling=SamplingParams(temperature=1.0, seed=99)
    )
    assert other != a


def test_logprobs_and_timings_in_steps() -> None:
    steps = steps_of(Generator(ScriptedBackend(fake_manifest())), [[1]], max_new_tokens=2, logprobs=True)
    expected = torch.tensor([10.0] + [0.0] * 31).log_softmax(-1)[0].item()
    assert [round(s.logprob, 5) for s in steps] == [round(expected, 5)] * 2
    assert steps[0].elapsed_s <= steps[1].elapsed_s


@pytest.mark.parametrize(
    ("prompts", "kw", "needle"),
    [
        ([[]], {}, "prompt 0 is empty"),
        ([list(range(25))], {}, "cache holds 24"),
        ([[99]], {}, "outside the vocabulary"),
        ([[1]], {"sampling": SamplingParams(temperature=-1)}, "temperature"),
        ([[1]], {"sampling": SamplingParams(top_p=0)}, "top-p"),
        ([[1]], {"sampling": SamplingParams(top_p=1.5)}, "top-p"),
        ([[1]], {"max_new_tokens": 0}, "max new tokens"),
        ([], {}, "no prompts"),
    ],
)
def test_bad_generation_input(prompts, kw, needle) -> None:
    with pytest.raises(InputError, match=needle):
        Generator(ScriptedBackend(fake_manifest())).generate(prompts, **kw)


def test_score_is_teacher_forced_and_batched() -> None:
    backend = ScriptedBackend(fake_manifest(batch=2, chunk=4))
    logits = Generator(backend).score([[5], [9, 10], [3]], [[20, 21, 22], [30, 31, 32], [1, 2, 3]])
    assert [tuple(t.shape) for t in logits] == [(3, 32)] * 3
    assert [t.argmax(-1).tolist() for t in logits] == [[6, 21, 22], [11, 31, 0], [4, 2, 3]]  # vocab 32 wraps
