"""The scheduling decision on plain values (runtime.schedule): admission order, which row prefills
how much, who decodes; and the loop's guards around it (one driver, token choice between runs)."""

from __future__ import annotations

import pytest

from llamatrt.base.errors import InputError
from llamatrt.runtime.prefill_cost import AddedCost, CallCost, PrefillCost
from llamatrt.runtime.requests import Request
from llamatrt.runtime.schedule import (
    MIN_PACKED_TOKENS,
    MIN_PREFILL_TOKENS,
    START_PREFILL_TOKENS,
    Budget,
    Prefill,
    RowState,
    decide,
    prefill_budget,
)
from llamatrt.runtime.scheduler import Scheduler
from llamatrt.tools.bench_workload import Lockstep
from tests.runtime.fake_backend import ScriptedBackend, fake_manifest

DECODING = RowState(submitted=0.0, windows=())


def waiting(submitted: float, *windows: tuple[int, int]) -> RowState:
    return RowState(submitted, tuple(windows))


def test_waiting_requests_take_free_rows_in_order_and_all_prefill_while_nobody_decodes() -> None:
    plan = decide([None, None, None], [waiting(1.0, (0, 4)), waiting(2.0, (0, 8), (8, 8))])
    assert plan.admit == (0, 1)
    assert plan.prefill == (Prefill(0, 0, 4, last=True), Prefill(1, 0, 8, last=False), Prefill(1, 8, 8, last=True))
    assert plan.decode == (0, 1)  # both prompts complete: their rows decode in the same step


def test_every_decoding_row_decodes_and_prefill_spends_its_budget_oldest_first() -> None:
    rows = [DECODING, DECODING, waiting(2.0, (0, 100)), waiting(1.0, (0, 10))]
    plan = decide(rows, [], budget=Budget(20))
    # 20 tokens of prefill: the older row's 10, then 10 of the newer one's window
    assert plan.prefill == (Prefill(3, 0, 10, last=True), Prefill(2, 0, 10, last=False))
    assert plan.decode == (0, 1, 3) and plan.prefill_tokens == 20


def test_a_long_prompt_never_takes_more_than_one_budget_while_others_decode() -> None:
    long = waiting(1.0, (0, 1000))
    assert decide([DECODING, long], [], budget=Budget(16)).prefill == (Prefill(1, 0, 16, last=False),)
    assert decide([DECODING, long], [], budget=Budget(16)).decode == (0,)
    assert decide([None, long], [], budget=Budget(16)).prefill == (Prefill(1, 0, 1000, last=True),)


def test_prefill_never_starves_and_fixed_windows_run_whole_or_wait() -> None:
    busy = [DECODING] * 4 + [waiting(1.0, (0, 16)), waiting(2.0, (0, 16))]
    # the budget is spent on decode: the first prefill call still takes its minimum
    assert decide(busy, [], budget=Budget(4, min_prefill=8)).prefill == (Prefill(4, 0, 8, last=False),)
    # fixed sizes: the first window runs whole, the next waits for a step with room
    fixed = decide(busy, [], budget=Budget(12, cut=False))
    assert fixed.prefill == (Prefill(4, 0, 16, last=True),) and fixed.decode == (0, 1, 2, 3, 4)
    assert decide(busy, [], budget=Budget(40, cut=False)).prefill_tokens == 32


def test_a_prompt_of_several_windows_decodes_after_its_last() -> None:
    two = waiting(1.0, (0, 4), (4, 4))
    busy = [DECODING, two]
    assert decide(busy, [], budget=Budget(5)).prefill == (Prefill(1, 0, 4, last=False),)
    assert decide(busy, [], budget=Budget(5)).decode == (0,)
    assert decide([DECODING, waiting(1.0, (4, 4))], [], budget=Budget(5)).decode == (0, 1)


def test_lockstep_admits_only_into_an_empty_batch() -> None:
    assert decide([DECODING, None], [waiting(1.0, (0, 4))], Lockstep()).admit == ()
    assert decide([None, None], [waiting(1.0, (0, 4))], Lockstep()).admit == (0,)


def test_an_empty_loop_plans_nothing() -> None:
    assert decide([None, None], []).idle


def test_a_second_driver_is_refused_with_one_line() -> None:
    scheduler = Scheduler(ScriptedBackend(fake_manifest()))
    scheduler.submit(Request([1], max_new_tokens=3))
    with scheduler.driving, pytest.raises(InputError, match="already running in another thread"):
        next(scheduler.run())  # another thread holds the loop
    assert [s.finish_reason for s in scheduler.run()][-1] == "length"


def test_token_choice_changes_only_between_runs() -> None:
    scheduler = Scheduler(ScriptedBackend(fake_manifest()))
    scheduler.submit(Request([1], max_new_tokens=3))
    with (
        pytest.raises(InputError, match="change how it chooses tokens between runs"),
        scheduler.choosing(lambda rows, logits: [7] * len(rows)),
    ):
        pass
    list(scheduler.run())
    with scheduler.choosing(lambda rows, logits: [7] * len(rows)):
        scheduler.submit(Request([1], max_new_tokens=2, use_eos=False))
        assert [s.token_id for s in scheduler.run()] == [7, 7]


def test_the_prefill_cost_keeps_the_fixed_part_apart_from_the_tokens() -> None:
    cost = PrefillCost()
    cost.observe(8, 0.010 + 8 * 0.001)
    assert cost.fit() is None  # one size says nothing of the split
    for tokens in (8, 32, 20, 100, 3):
        cost.observe(tokens, 0.010 + tokens * 0.001)
    fit = cost.fit()
    assert fit is not None and fit.fixed_s == pytest.approx(0.010) and fit.token_s == pytest.approx(0.001)
    # a per-token average of the small calls would have said 2.25 ms a token
    assert PrefillCost(window=2).fit() is None


def test_the_budget_pays_a_calls_fixed_cost_back_and_keeps_pace_with_decode() -> None:
    assert prefill_budget(None, None, cut=True) == Budget(START_PREFILL_TOKENS, True, MIN_PREFILL_TOKENS)
    # fixed 10 ms, 1 ms a token: 40 tokens keep the fixed cost at a fifth of the call
    assert prefill_budget(CallCost(0.010, 0.001), 0.015, cut=True).tokens == 40
    # a GPU-like call, nearly all per-token cost: the decode step's time sets it
    assert prefill_budget(CallCost(0.0, 0.0001), 0.015, cut=False) == Budget(150, False, MIN_PREFILL_TOKENS)
    assert prefill_budget(CallCost(0.0, 1.0), 0.015, cut=True).tokens == MIN_PREFILL_TOKENS


def test_a_packed_call_spends_its_budget_at_the_decode_steps_pace_alone() -> None:
    """Prefill tokens that ride in the decode call pay no call's fixed cost of their own: they add
    at most PACKED_SHARE of a decode step (0.6 x 15 ms at 1 ms a token), not the 40 tokens that a
    call of their own would take to pay its fixed cost back; a few tokens where each is dear."""
    assert prefill_budget(CallCost(0.010, 0.001), 0.015, cut=True, packed=True) == Budget(9, True, MIN_PACKED_TOKENS)
    assert prefill_budget(None, None, cut=True, packed=True).tokens == MIN_PREFILL_TOKENS  # costs not known yet
    assert prefill_budget(CallCost(0.0, 0.01), 0.015, cut=True, packed=True).tokens == MIN_PACKED_TOKENS


def test_what_prompt_tokens_add_to_a_packed_call_is_their_recent_average() -> None:
    cost = AddedCost(window=2)
    assert cost.fit() is None
    cost.observe(8, 0.016)  # an early call: short contexts, 2 ms a token
    for _ in range(2):  # the recent ones: 3 ms a token, the older call out of the window
        cost.observe(10, 0.030)
    assert cost.fit() == CallCost(0.0, pytest.approx(0.003))
