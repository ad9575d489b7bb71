"""The scheduling decision, kept apart from applying it (as vLLM v1 keeps `schedule()` apart from
`update_from_output()`).

Given what each row of the cache holds and which requests wait, `decide` says which waiting
requests take which free rows, which row runs a prefill call of how many tokens in this step, and
which rows run the decode call. It runs no graph, touches no cache and keeps no state, so it reads
(and is tested) on plain values; runtime.scheduler applies its plan.

The rules: a waiting request takes the first free row (FIFO) when the admission policy agrees; one
prefill call per step, for the row whose request came first, so rows already decoding wait at most
one prefill call between two of their tokens; that call is cut to `prefill_limit` tokens while
other rows decode (a graph that takes any number of tokens); every row whose prompt is in the cache
decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


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
    prefill: Prefill | None = None
    decode: tuple[int, ...] = ()  # rows in the decode call (the prefill row too, if its prompt completes)

    @property
    def idle(self) -> bool:
        return self.prefill is None and not self.decode


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
    prefill_limit: int | None = None,
) -> Plan:
    """The plan of one step. `waiting` is the queue's head (at least as many as free rows, if there
    are that many); `prefill_limit` caps a prefill call while other rows decode (None: no cap)."""
    after = list(rows)
    admit: list[int] = []
    if waiting and admission.admits(rows):
        free = [b for b, row in enumerate(rows) if row is None]
        for b, request in zip(free, waiting, strict=False):
            after[b] = request
            admit.append(b)
    prefill = None
    prefilling = [b for b, row in enumerate(after) if row is not None and row.windows]
    if prefilling:
        b = min(prefilling, key=lambda b: after[b].submitted)  # type: ignore[union-attr]
        windows = after[b].windows  # type: ignore[union-attr]
        start, size = windows[0]
        others_decode = any(row is not None and not row.windows for k, row in enumerate(after) if k != b)
        cut = prefill_limit is not None and others_decode and size > prefill_limit
        prefill = Prefill(b, start, prefill_limit if cut else size, last=not cut and len(windows) == 1)  # type: ignore[arg-type]
    decode = tuple(
        b
        for b, row in enumerate(after)
        if row is not None and (not row.windows or (prefill is not None and prefill.row == b and prefill.last))
    )
    return Plan(tuple(admit), prefill, decode)
