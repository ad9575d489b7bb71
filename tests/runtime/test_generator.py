"""The loop, tested on a scripted backend (next token = last input token + 1): the slots each row
writes, admission order, freeing and refilling rows, prefill plans, stop rules, seeds, cancellation."""

from __future__ import annotations

import threading
from collections import deque

import pytest
import torch

from llamatrt.base.errors import InputError
from llamatrt.runtime.detokenizer import TextStream
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.kv_state import plan_prefill
from llamatrt.runtime.prefill_cost import CallCost
from llamatrt.runtime.sampling import SamplingParams
from llamatrt.runtime.schedule import Budget
from llamatrt.runtime.scheduler import Request, Scheduler
from llamatrt.tools.bench_workload import Lockstep
from llamatrt.tools.teacher_forcing import score
from tests.runtime.fake_backend import ScriptedBackend, SpacedIds, fake_manifest


def steps_of(gen: Generator, prompts, **kw):
    return list(gen.stream(prompts, **kw))


def calls(backend: ScriptedBackend, graph: str | None = None) -> list[dict]:
    return [c for c in backend.calls if graph is None or c["graph"] == graph]


def test_prefill_plans_end_on_the_prompt_and_pad_only_short_prompts() -> None:
    assert plan_prefill(4, [4], 4).windows == ((0, 4),)
    assert plan_prefill(10, [4], 4).windows == ((0, 4), (4, 4), (6, 4))  # the last window overlaps back
    assert plan_prefill(1, [4], 4) == plan_prefill(1, [4], 4).__class__(3, ((0, 4),))  # padded to one window
    assert plan_prefill(20, [16, 128], 128).windows == ((0, 16), (4, 16))  # two short calls, not one of 128
    assert plan_prefill(130, [16, 128], 128).windows == ((0, 128), (114, 16))
    assert plan_prefill(300, [16, 128], 128).windows == ((0, 128), (128, 128), (256, 16), (272, 16), (284, 16))
    assert plan_prefill(256, [16, 128], 128).windows == ((0, 128), (128, 128))
    dynamic = plan_prefill(10, None, 4)  # a graph with open tokens: no padding, exact windows
    assert dynamic.pad == 0 and dynamic.windows == ((0, 4), (4, 4), (8, 2))


def test_chunked_prefill_then_decode_slots() -> None:
    backend = ScriptedBackend(fake_manifest(chunk=4))
    tokens = Generator(backend).generate([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], max_new_tokens=3)
    assert tokens == [[11, 12, 13]]
    starts = [(c["graph"], c["cache_position"].tolist()) for c in backend.calls]
    assert starts == [
        ("prefill", [[0, 1, 2, 3]]),
        ("prefill", [[4, 5, 6, 7]]),
        ("prefill", [[6, 7, 8, 9]]),
        ("decode", [[10]]),
        ("decode", [[11]]),
    ]
    assert backend.calls[2]["input_ids"].tolist() == [[7, 8, 9, 10]]
    assert backend.calls[3]["position_ids"].tolist() == [[10]]


def test_a_short_prompt_is_padded_in_its_own_row_only() -> None:
    backend = ScriptedBackend(fake_manifest(batch=2, chunk=4))
    Generator(backend).generate([[5], [6, 7, 8, 9, 10]], max_new_tokens=4)
    first = calls(backend, "prefill")[0]
    assert first["row"] == 0 and first["input_ids"].tolist() == [[0, 0, 0, 5]]
    assert first["position_ids"].tolist() == [[0, 0, 0, 0]] and first["attention_mask"][0, :5].tolist() == [
        0,
        0,
        0,
        1,
        1,
    ]
    decodes = calls(backend, "decode")
    # nobody decodes yet: both prompts are prefilled in the first step, then decode together
    assert [c["row"] for c in calls(backend, "prefill")] == [0, 1, 1]
    both = decodes[0]
    assert both["cache_position"][:, 0].tolist() == [4, 5]  # each row at its own slot: row 0 is 1 token
    assert both["position_ids"][:, 0].tolist() == [1, 5]  # in after 3 padding slots; row 1 is 5 tokens in
    assert both["attention_mask"][1, :6].tolist() == [1, 1, 1, 1, 1, 1]  # row 1 has no padding


def test_a_row_still_prefilling_writes_its_next_window_in_the_others_decode(monkeypatch) -> None:
    """Row 0 decodes while row 1's prompt of three windows is prefilled a budget at a time: in each
    decode call row 1 writes the slot its next prefill call writes anyway, and its tokens come after."""
    backend = ScriptedBackend(fake_manifest(batch=2, chunk=4, cache=32))
    scheduler = Scheduler(backend)
    monkeypatch.setattr(scheduler, "budget", lambda: Budget(4, cut=False))  # one window a step
    first = scheduler.submit(Request([1], max_new_tokens=6), 0)
    scheduler.step()
    second = scheduler.submit(Request(list(range(2, 14)), max_new_tokens=2), 1)
    steps = list(scheduler.run([first, second]))
    step_calls = [(c["graph"], c["cache_position"][-1, 0].item()) for c in backend.calls[2:8]]
    assert step_calls == [("prefill", 0), ("decode", 4), ("prefill", 4), ("decode", 8), ("prefill", 8), ("decode", 12)]
    assert [s.token_id for s in steps if s.index == 1 and s.token_id is not None] == [14, 15]


def test_rows_at_different_positions_equal_each_alone() -> None:
    prompts = [[5, 6, 7, 8, 9, 10], [3], [20, 21]]
    batched = Generator(ScriptedBackend(fake_manifest(batch=3, chunk=4))).generate(prompts, max_new_tokens=4)
    alone = [Generator(ScriptedBackend(fake_manifest(chunk=4))).generate([p], max_new_tokens=4)[0] for p in prompts]
    assert batched == alone == [[11, 12, 13, 14], [4, 5, 6, 7], [22, 23, 24, 25]]


def test_a_request_joins_the_row_freed_first_and_rows_run_on() -> None:
    """B=2, three requests: the third waits in the queue, then takes row 1 (freed first) while row 0
    keeps decoding; its prefill is one batch-1 call on row 1 between two decode steps of row 0."""
    backend = ScriptedBackend(fake_manifest(batch=2, chunk=4, cache=32))
    scheduler = Scheduler(backend)
    long, short, late = (scheduler.submit(Request([1], max_new_tokens=n), i) for i, n in enumerate((8, 2, 3)))
    steps = list(scheduler.run([long, short, late]))
    by_request = {i: [s.token_id for s in steps if s.index == i and s.token_id is not None] for i in range(3)}
    assert by_request == {0: [2, 3, 4, 5, 6, 7, 8, 9], 1: [2, 3], 2: [2, 3, 4]}
    prefills = [c["row"] for c in calls(backend, "prefill")]
    assert prefills == [0, 1, 1]  # admission in order; the late one into the row the short one freed
    late_prefill = next(i for i, c in enumerate(backend.calls) if c["graph"] == "prefill" and i > 1)
    before, after = backend.calls[late_prefill - 1], backend.calls[late_prefill + 1]
    assert before["graph"] == after["graph"] == "decode"  # row 0 decoded on both sides of the admission
    assert after["cache_position"][:, 0].tolist() == [before["cache_position"][0, 0] + 1, 4]
    assert scheduler.idle and scheduler.rows == [None, None]  # every row freed


def test_lockstep_admission_waits_for_the_whole_batch() -> None:
    backend = ScriptedBackend(fake_manifest(batch=2, chunk=4, cache=32))
    scheduler = Scheduler(backend, admission=Lockstep())
    handles = [scheduler.submit(Request([1], max_new_tokens=n), i) for i, n in enumerate((6, 2, 2))]
    list(scheduler.run(handles))
    prefill_at = [i for i, c in enumerate(backend.calls) if c["graph"] == "prefill"]
    decode_at = [i for i, c in enumerate(backend.calls) if c["graph"] == "decode"]
    assert prefill_at[2] > decode_at[4]  # the third started only after the 6-token request ended


def test_a_long_prefill_does_not_freeze_running_rows(monkeypatch) -> None:
    backend = ScriptedBackend(fake_manifest(batch=2, chunk=4, cache=64))
    scheduler = Scheduler(backend)
    monkeypatch.setattr(scheduler, "budget", lambda: Budget(4, cut=False))  # one window a step
    running = scheduler.submit(Request([1], max_new_tokens=20), 0)
    for _ in range(3):
        scheduler.step()  # row 0 is decoding
    scheduler.submit(Request(list(range(1, 21)), max_new_tokens=2), 1)  # five prefill calls
    list(scheduler.run([running]))
    graphs = [c["graph"] for c in backend.calls]
    first = graphs.index("prefill", 1)
    assert graphs[first : first + 10] == ["prefill", "decode"] * 5  # one budget of prefill between two decode steps


def test_cancelling_frees_the_row_and_leaves_the_others_unchanged() -> None:
    backend = ScriptedBackend(fake_manifest(batch=2, chunk=4, cache=32))
    scheduler = Scheduler(backend)
    keep = scheduler.submit(Request([5], max_new_tokens=8), 0)
    drop = scheduler.submit(Request([9], max_new_tokens=8), 1)
    waiting = scheduler.submit(Request([20], max_new_tokens=2), 2)
    steps = []
    for _ in range(3):
        steps += scheduler.step()
    drop.cancel()
    steps += list(scheduler.run([keep, drop, waiting]))
    assert [s.token_id for s in steps if s.index == 0 and s.token_id] == [6, 7, 8, 9, 10, 11, 12, 13]
    assert [s.finish_reason for s in steps if s.index == 1][-1] == "cancelled"
    assert [s.token_id for s in steps if s.index == 2 and s.token_id] == [21, 22]  # admitted into the freed row
    assert [c["row"] for c in calls(backend, "prefill")] == [0, 1, 1]


class _CountingQueue(deque):
    """A queue that counts the entries read out of it."""

    read = 0

    def __iter__(self):
        for handle in super().__iter__():
            self.read += 1
            yield handle


def test_a_step_reads_no_more_of_the_queue_than_it_admits_until_a_waiting_request_is_cancelled() -> None:
    """A step's own work does not grow with the requests waiting: the plan reads as many as there
    are free rows, and the queue is looked through for cancelled requests only after a cancel."""
    scheduler = Scheduler(ScriptedBackend(fake_manifest(batch=2, chunk=4, cache=32)))
    scheduler.queue = queue = _CountingQueue()
    handles = [scheduler.submit(Request([5 + i % 20], max_new_tokens=4), i) for i in range(200)]
    for _ in range(3):
        scheduler.step()
    assert queue.read <= 2  # the two admitted, not the 198 behind them
    handles[150].cancel()
    steps = scheduler.step()
    assert [s.finish_reason for s in steps if s.index == 150] == ["cancelled"]
    read = queue.read
    assert read >= 197  # the one look through the queue the cancel asked for
    for _ in range(3):
        scheduler.step()
    assert queue.read - read <= 2


def test_requests_stream_to_another_thread() -> None:
    scheduler = Scheduler(ScriptedBackend(fake_manifest(batch=2, chunk=4, cache=32)))
    stop = threading.Event()
    loop = threading.Thread(target=scheduler.serve_forever, args=(stop,), daemon=True)
    loop.start()
    try:
        handles = [scheduler.submit(Request([k], max_new_tokens=3), k) for k in (1, 10, 20)]
        got = [[s.token_id for s in h.steps(timeout=10) if s.token_id is not None] for h in handles]
    finally:
        stop.set()
        loop.join(timeout=10)
    assert got == [[2, 3, 4], [11, 12, 13], [21, 22, 23]] and not loop.is_alive()


def test_stop_ids_are_not_emitted_and_several_are_allowed() -> None:
    gen = Generator(ScriptedBackend(fake_manifest(batch=2)), stop_ids=[8, 25])
    steps = steps_of(gen, [[5], [22]], max_new_tokens=10)
    assert gen.generate([[5], [22]], max_new_tokens=10) == [[6, 7], [23, 24]]
    finals = {s.index: s for s in steps if s.finish_reason}
    assert finals[0].finish_reason == finals[1].finish_reason == "stop" and finals[0].token_id is None
    assert (finals[0].stop, finals[1].stop) == (8, 25)  # which stop ended each


def test_per_request_stop_ids_and_strings() -> None:
    gen = Generator(ScriptedBackend(fake_manifest()), text=lambda stops: TextStream(SpacedIds(), stops))
    steps = steps_of(gen, [[5]], max_new_tokens=10, stop_strings=["8 9"])
    assert [s.token_id for s in steps] == [6, 7, 8, 9]
    assert steps[-1].finish_reason == "stop" and steps[-1].stop == "8 9"
    by_id = steps_of(gen, [[5]], max_new_tokens=10, stop_ids=[7])
    assert [s.token_id for s in by_id] == [6, None] and by_id[-1].stop == 7


def test_max_new_tokens_gives_length() -> None:
    steps = steps_of(Generator(ScriptedBackend(fake_manifest())), [[1]], max_new_tokens=3)
    assert [s.finish_reason for s in steps] == [None, None, "length"]


def test_a_request_too_long_for_its_row_is_capped_or_refused_never_overflows() -> None:
    backend = ScriptedBackend(fake_manifest(chunk=4, cache=12))
    steps = steps_of(Generator(backend), [list(range(1, 11))], max_new_tokens=50, fit="cap")
    assert [s.token_id for s in steps] == [11, 12, 13] and steps[-1].finish_reason == "length"
    assert max(int(c["cache_position"].max()) for c in backend.calls) == 11  # the last slot, written once
    with pytest.raises(InputError, match="does not fit the cache of 12; ask for at most 3 new tokens"):
        Generator(ScriptedBackend(fake_manifest(chunk=4, cache=12))).generate(
            [list(range(1, 11))], max_new_tokens=50, fit="refuse"
        )
    exactly_full = steps_of(
        Generator(ScriptedBackend(fake_manifest(chunk=4, cache=12))), [list(range(12))], max_new_tokens=5, fit="cap"
    )
    assert [(s.token_id, s.finish_reason) for s in exactly_full] == [(12, "length")]


def test_seeded_sampling_is_reproducible_per_prompt() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)

    def run(batch: int, prompts: list[list[int]]) -> list[list[int]]:
        return Generator(ScriptedBackend(fake_manifest(batch=batch), flat=True)).generate(
            prompts, max_new_tokens=8, sampling=params
        )

    a, b = run(1, [[1]]), run(1, [[1]])
    assert a == b
    assert run(2, [[1], [2]])[0] == a[0]  # same seed, same tokens alone or in a batch
    other = Generator(ScriptedBackend(fake_manifest(), flat=True)).generate(
        [[1]], max_new_tokens=8, sampling=SamplingParams(temperature=1.0, seed=99)
    )
    assert other != a


def test_logprobs_top_logprobs_and_timings_in_steps() -> None:
    steps = steps_of(
        Generator(ScriptedBackend(fake_manifest())), [[1]], max_new_tokens=2, logprobs=True, top_logprobs=2
    )
    expected = torch.tensor([10.0] + [0.0] * 31).log_softmax(-1)
    assert [round(s.logprob, 5) for s in steps] == [round(expected[0].item(), 5)] * 2
    assert steps[0].top_logprobs[0] == (2, pytest.approx(expected[0].item()))
    assert steps[0].top_logprobs[1][1] == pytest.approx(expected[1].item())
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
        ([[1]], {"stop_strings": [""]}, "stop string is empty"),
        ([[1]], {"stop_ids": [40]}, "stop id is outside"),
        ([[1]], {"top_logprobs": 21}, "top logprobs"),
        ([], {}, "no prompts"),
    ],
)
def test_bad_generation_input(prompts, kw, needle) -> None:
    with pytest.raises(InputError, match=needle):
        Generator(ScriptedBackend(fake_manifest())).generate(prompts, **kw)


def test_score_is_teacher_forced_and_batched() -> None:
    backend = ScriptedBackend(fake_manifest(batch=2, chunk=4))
    logits = score(Generator(backend), [[5], [9, 10], [3]], [[20, 21, 22], [30, 31, 32], [1, 2, 3]])
    assert [tuple(t.shape) for t in logits] == [(3, 32)] * 3
    assert [t.argmax(-1).tolist() for t in logits] == [[6, 21, 22], [11, 31, 0], [4, 2, 3]]  # vocab 32 wraps


def test_on_a_graph_with_open_tokens_a_prompt_is_prefilled_in_calls_sized_by_the_budget(monkeypatch) -> None:
    """While a row decodes, a long prompt's prefill calls take the step's budget, sized from what
    calls cost (schedule.prefill_budget), so the decoding row is not held for a whole chunk."""
    manifest = fake_manifest(batch=2, chunk=16, cache=64, open_tokens=True)
    backend = ScriptedBackend(manifest)
    scheduler = Scheduler(backend)
    assert scheduler.prefill_sizes is None
    running = scheduler.submit(Request([1], max_new_tokens=30), 0)
    for _ in range(2):
        scheduler.step()
    # fixed 2 ms, 2 ms a token, 10 ms decode steps: 4 x 2 / 2 = 4 tokens pay the fixed cost back,
    # 1.0 x 10 / 2 = 5 fit in a decode step: at least 8
    monkeypatch.setattr(scheduler.prefill_cost, "fit", lambda: CallCost(0.002, 0.002))
    scheduler._decode_step_s = 0.010
    late = scheduler.submit(Request(list(range(1, 31)), max_new_tokens=2), 1)
    steps = list(scheduler.run([running, late]))
    prefills = [c for c in backend.calls if c["row"] == 1]  # batch-1 calls on row 1: its prefill
    assert [c["input_ids"].shape[1] for c in prefills][:2] == [8, 8]  # not one call of 16
    assert sum(c["input_ids"].shape[1] for c in prefills) == 30  # the whole prompt, once
    assert [s.token_id for s in steps if s.index == 1 and s.token_id is not None] == [31, 0]
