"""A fixed mixed workload for `llamatrt bench --workload N`: what a server sees, all at once.

N requests, prompt lengths and output lengths drawn (seeded, so every run and every artifact gets
the same ones) from 10-300 prompt tokens and 16-256 new tokens, submitted together to one
scheduler. Measured: total output tokens/s, time to first token, and the gaps between two tokens of
a running request against the median decode call.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from llamatrt.base.artifact.feeds import fixed_prompt
from llamatrt.runtime.backend import Backend
from llamatrt.runtime.requests import Request
from llamatrt.runtime.schedule import IN_FLIGHT, Admission, RowState
from llamatrt.runtime.scheduler import Scheduler

PROMPT_TOKENS = (10, 300)
NEW_TOKENS = (16, 256)


@dataclass(frozen=True)
class Workload:
    prompts: tuple[tuple[int, ...], ...]
    new_tokens: tuple[int, ...]


def mixed_workload(count: int, vocab: int, capacity: int) -> Workload:
    """The same `count` requests for every artifact (seeded), each fitting a cache of `capacity`."""
    draw = random.Random(20261201)
    prompts, budgets = [], []
    for i in range(count):
        length = draw.randint(*PROMPT_TOKENS)
        budget = min(draw.randint(*NEW_TOKENS), capacity // 2)  # a small test cache halves them
        length = max(1, min(length, capacity - budget - 16))  # room for a static prefill's padding
        ids = fixed_prompt(1, length, vocab)[0].add(31 * i).remainder(vocab).tolist()
        prompts.append(tuple(ids))
        budgets.append(budget)
    return Workload(tuple(prompts), tuple(budgets))


class Lockstep:
    """Admit only into an empty batch: the classic batch that starts and ends together, the baseline
    in-flight batching is measured against."""

    def admits(self, rows: Sequence[RowState | None]) -> bool:
        return all(row is None for row in rows)


ADMISSIONS: dict[str, Admission] = {"continuous": IN_FLIGHT, "lockstep": Lockstep()}


class DecodeTimes:
    """An observer of the loop: how long each decode call took."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __call__(self, role: str, seconds: float, rows: int) -> None:
        if role == "decode":
            self.seconds.append(seconds)


def workload_scheduler(backend: Backend, admission: str) -> tuple[Scheduler, DecodeTimes]:
    """A scheduler (and its cache) for one run, made before the run's clock starts."""
    times = DecodeTimes()
    return Scheduler(backend, admission=ADMISSIONS[admission], observer=times), times


def run_workload(scheduler: Scheduler, decode_times: DecodeTimes, workload: Workload) -> dict[str, float]:
    """Submit every request at once, run them to the end; the figures of one run."""
    started = time.perf_counter()
    handles = [
        scheduler.submit(Request(list(p), max_new_tokens=n, use_eos=False), i)
        for i, (p, n) in enumerate(zip(workload.prompts, workload.new_tokens, strict=True))
    ]
    times: dict[int, list[float]] = {h.index: [] for h in handles}
    for step in scheduler.run(handles):
        if step.token_id is not None:
            times[step.index].append(step.elapsed_s)
    wall = time.perf_counter() - started
    gaps = [b - a for t in times.values() for a, b in itertools.pairwise(t)]
    first = [t[0] for t in times.values() if t]
    steps = decode_times.seconds
    return {
        "output_tokens_per_s": sum(len(t) for t in times.values()) / wall,
        "wall_s": wall,
        "ttft_p50_ms": 1000 * statistics.median(first),
        "inter_token_p50_ms": 1000 * statistics.median(gaps),
        "inter_token_p99_ms": 1000 * _percentile(gaps, 99),
        "decode_step_p50_ms": 1000 * statistics.median(steps),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
