"""The scheduling decision on plain values (runtime.schedule): admission order, which row prefills
how much, who decodes; and the loop's guards around it (one driver, token choice between runs)."""

from __future__ import annotations

import pytest

from llamatrt.base.errors import InputError
from llamatrt.runtime.requests import Request
from llamatrt.runtime.schedule import Plan, Prefill, RowState, decide
from llamatrt.runtime.scheduler import Scheduler
from llamatrt.tools.bench_workload import Lockstep
from tests.runtime.fake_backend import ScriptedBackend, fake_manifest

DECODING = RowState(submitted=0.0, windows=())


def waiting(submitted: float, *windows: tuple[int, int]) -> RowState:
    return RowState(submitted, tuple(windows))


def test_waiting_requests_take_free_rows_in_order_and_the_oldest_prefills() -> None:
    plan = decide([DECODING, None, None], [waiting(1.0, (0, 4)), waiting(2.0, (0, 8))])
    assert plan == Plan(admit=(1, 2), prefill=Prefill(1, 0, 4, last=True), decode=(0, 1))


def test_a_prefill_call_is_cut_while_others_decode_and_not_when_alone() -> None:
    long = waiting(1.0, (0, 100))
    assert decide([DECODING, long], [], prefill_limit=16).prefill == Prefill(1, 0, 16, last=False)
    assert decide([DECODING, long], [], prefill_limit=16).decode == (0,)
    assert decide([None, long], [], prefill_limit=16).prefill == Prefill(1, 0, 100, last=True)


def test_a_prompt_of_several_windows_decodes_after_its_last() -> None:
    two = waiting(1.0, (0, 4), (4, 4))
    assert decide([two], []) == Plan(prefill=Prefill(0, 0, 4, last=False))
    assert decide([waiting(1.0, (4, 4))], []).decode == (0,)


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
