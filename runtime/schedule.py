"""The scheduling decision, kept apart from applying it (as vLLM v1 keeps `schedule()` apart from
`update_from_output()`).

Given what each row of the cache holds and which requests wait, `decide` says which waiting
requests take which free rows, which prefill calls run in this step (several rows, several windows
each, in order) and which rows run the decode call. It runs no graph, touches no cache and keeps no
state, so it reads (and is tested) on plain values; runtime.scheduler applies its plan.

The rules, after vLLM's chunked prefill and its `max_num_batched_tokens`: a waiting request takes
the first free row (FIFO) when the admission policy agrees. Every row whose prompt is in the cache
decodes first. Prefill gets the step's budget of tokens (`prefill_budget` sizes it from what calls
cost: on a CPU a decode token and a prefill token cost nothing alike), spent on the prefilling rows
oldest first, window after window; where the graph takes any number of tokens the last window is
cut to what is left, where its sizes are fixed a window runs whole or waits. The step's first prefill call
always runs (at least `min_prefill` tokens of it, where windows can be cut), so prefill never
starves. When no row decodes there is nobody to keep waiting: every prefilling row's prompt runs.
Where the graph packs tokens, the scheduler runs the plan's decode rows and each prefilling row's
first call as one call, and the budget is what those prompt tokens may add to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from llamatrt.runtime.prefill_cost import CallCost


@dataclass(frozen=True)
class RowState:
    """What the decision reads of a request in a row (or waiting for one)."""

    submitted: float  # when it was submitted: the oldest prefilling row goes first
    windows: tuple[tuple[int, int], ...]  # prefill calls still to run, (first slot, tokens); () once decoding


@dataclass(frozen=True)
class Prefill:
    row: int
    start: int  # the first cache slot this call writes
    size: int  # tokens in this call
    last: bool  # the prompt's last call: its logits give the request's first token


@dataclass(frozen=True)
class Plan:
    admit: tuple[int, ...] = ()  # free rows that take the first waiting requests, in this order
    prefill: tuple[Prefill, ...] = ()  # the prefill calls of this step, in order
    decode: tuple[int, ...] = ()  # rows in the decode call (prefilling rows whose prompt completes too)

    @property
    def idle(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def prefill_tokens(self) -> int:
        return sum(call.size for call in self.prefill)


MIN_PREFILL_TOKENS = 8
# ... and where they ride in the decode call, which pays the fixed cost: a few tokens are worth it
MIN_PACKED_TOKENS = 2


@dataclass(frozen=True)
class Budget:
    """Tokens a step may spend on prefill after its decode tokens; None: no limit."""

    tokens: int | None = None
    cut: bool = True  # whether a window may be cut (a graph that takes any number of tokens)
    min_prefill: int = MIN_PREFILL_TOKENS  # the least a step's first prefill call takes, where windows are cut


UNLIMITED = Budget()
START_PREFILL_TOKENS = 32  # before the loop has measured what its calls cost
# A prefill call spends at most this share of its time on its fixed cost (what a call costs whatever
# its tokens): smaller calls would spend the step on reading weights rather than on tokens
FIXED_SHARE = 1 / 5
# ... and takes at least the tokens that fit in this share of a decode step beyond it
PREFILL_SHARE = 1.0
# ... where they ride in the decode call: what they add to it, as a share of a decode step (below one,
# so a running row's slowest gap, host noise included, stays within twice its usual one)
PACKED_SHARE = 0.6


def prefill_budget(cost: CallCost | None, decode_step_s: float | None, cut: bool, packed: bool = False) -> Budget:
    """The step's prefill tokens while rows decode, from what calls cost (runtime.prefill_cost): the
    larger of the tokens that pay a call's fixed cost back (it is then at most FIXED_SHARE of the
    call) and those that fit in PREFILL_SHARE x a decode step. A decoding row so waits at most one
    such call between two of its tokens, and prefill keeps pace with the rows it refills. `packed`:
    the prefill tokens ride in the decode call (a graph that packs tokens), which pays the fixed cost
    anyway: only the pace counts, so a step costs at most (1 + PACKED_SHARE) decode steps, and
    before the costs are known it takes the least (a small slice costs no call of its own)."""
    least = MIN_PACKED_TOKENS if packed else MIN_PREFILL_TOKENS
    if cost is None or decode_step_s is None:
        return Budget(MIN_PREFILL_TOKENS if packed else START_PREFILL_TOKENS, cut, least)
    amortized = 0.0 if packed else cost.fixed_s * (1 - FIXED_SHARE) / (FIXED_SHARE * cost.token_s)
    paced = (PACKED_SHARE if packed else PREFILL_SHARE) * decode_step_s / cost.token_s
    return Budget(int(max(least, amortized, paced)), cut, least)


class Admission(Protocol):
    """When waiting requests may take free rows."""

    def admits(self, rows: Sequence[RowState | None]) -> bool: ...


class InFlight:
    """Admit into any free row at once: the others keep decoding (in-flight batching)."""

    def admits(self, rows: Sequence[RowState | None]) -> bool:
        return True


IN_FLIGHT = InFlight()


def decide(
    rows: Sequence[RowState | None],
    waiting: Sequence[RowState],
    admission: Admission = IN_FLIGHT,
    budget: Budget = UNLIMITED,
) -> Plan:
    """The plan of one step. `waiting` is the queue's head (at least as many as free rows, if there
    are that many); `budget` bounds the step's prefill tokens while rows decode."""
    after = list(rows)
    admit: list[int] = []
    if waiting and admission.admits(rows):
        free = [b for b, row in enumerate(rows) if row is None]
        for b, request in zip(free, waiting, strict=False):
            after[b] = request
            admit.append(b)
    decoding = [b for b, row in enumerate(after) if row is not None and not row.windows]
    left = None if not decoding or budget.tokens is None else budget.tokens
    calls: list[Prefill] = []
    completing: list[int] = []
    # oldest first (a tie by row)
    prefilling = [
        b for _, b in sorted((row.submitted, b) for b, row in enumerate(after) if row is not None and row.windows)
    ]
    for b in prefilling:
        windows = after[b].windows  # type: ignore[union-attr]
        for k, (start, size) in enumerate(windows):
            take = size if left is None else _fits(size, left, budget, first=not calls)
            if take == 0:
                break
            calls.append(Prefill(b, start, take, last=take == size and k == len(windows) - 1))
            if left is not None:
                left -= take
            if take < size:
                break
        if calls and calls[-1].row == b and calls[-1].last:
            completing.append(b)
        if left is not None and left <= 0:
            break
    decode = tuple(b for b in range(len(after)) if b in decoding or b in completing)
    return Plan(tuple(admit), tuple(calls), decode)


def _fits(size: int, left: int, budget: Budget, first: bool) -> int:
    """Tokens of a window of `size` that run with `left` tokens of budget left."""
    if size <= left:
        return size
    if budget.cut:  # never a call below the minimum, whose fixed cost would outweigh its tokens
        return min(size, max(left, budget.min_prefill)) if first else (left if left >= budget.min_prefill else 0)
    return size if first else 0
