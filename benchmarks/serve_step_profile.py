"""Where a served loop's time goes: `llamatrt serve` in this process with an observer on its
scheduler. On Ctrl-C (or SIGTERM) it prints the steps, the prefill and decode graph calls (count,
seconds, rows a call, ms a call), the Python time of a step outside its graph calls, the
prefill budget and call cost the scheduler has learnt, the prefix cache's copies (blocks read into
it, blocks written into an admitted row), and the steps' p50 and p99 with the calls and copies of the
slowest 1%. Drive it with `llamatrt bench-serve`. A
BUDGET (tokens) replaces the learnt budget by a fixed one, to measure what the budget's size does;
SHARE sets the share of a decode step a packed call's prompt tokens may add (schedule.PACKED_SHARE).

Usage: .venv/bin/python benchmarks/serve_step_profile.py ARTIFACT [PORT] [BUDGET|-] [SHARE]
       .venv/bin/llamatrt bench-serve http://127.0.0.1:PORT --clients 8 --requests 32   (another shell)
"""

from __future__ import annotations

import atexit
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import uvicorn

from llamatrt.runtime import schedule
from llamatrt.runtime.schedule import MIN_PREFILL_TOKENS, Budget
from llamatrt.server.app import create_app
from llamatrt.server.engine import EngineConfig


def main(artifact: str, port: int, budget: int | None) -> None:
    app = create_app(EngineConfig(Path(artifact), verify=False))
    scheduler = app.state.engine.scheduler
    calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])  # role -> calls, seconds, rows
    steps = {"count": 0, "seconds": 0.0, "first": 0.0}

    each: list[tuple[float, str]] = []  # (seconds, its calls) of every step
    this_step: list[str] = []

    def observe(role: str, seconds: float, rows: int) -> None:
        calls[role][0] += 1
        calls[role][1] += seconds
        calls[role][2] += rows
        this_step.append(f"{role} {1e3 * seconds:.1f}")

    copies = {"read": 0.0, "write": 0.0}  # this step's prefix-cache copies, seconds
    copied = {"read": [0, 0.0, 0.0], "write": [0, 0.0, 0.0]}  # steps with some, seconds, the most in a step

    def timed_copy(kind: str, copy: Callable[..., object]) -> Callable[..., object]:
        def timed(*args: object) -> object:
            started = time.perf_counter()
            try:
                return copy(*args)
            finally:
                copies[kind] += time.perf_counter() - started

        return timed

    scheduler.kv.read_slots = timed_copy("read", scheduler.kv.read_slots)
    scheduler.kv.write_slots = timed_copy("write", scheduler.kv.write_slots)
    step, plan = scheduler.step, scheduler.plan

    def recorded_plan() -> object:  # the step's prompt tokens and the furthest slot they start at
        decided = plan()
        if decided.prefill:
            this_step.append(
                f"{decided.prefill_tokens} prompt tokens from slot {max(call.start for call in decided.prefill)}"
            )
        return decided

    def timed_step() -> object:
        started = time.perf_counter()
        steps["first"] = steps["first"] or started
        this_step.clear()
        copies.update(read=0.0, write=0.0)
        events = step()
        seconds = time.perf_counter() - started
        for kind, spent in copies.items():
            if spent:
                this_step.append(f"prefix {kind} {1e3 * spent:.1f}")
                copied[kind][0] += 1
                copied[kind][1] += spent
                copied[kind][2] = max(copied[kind][2], spent)
        steps["count"] += 1
        steps["seconds"] += seconds
        if this_step:
            each.append((seconds, ", ".join(this_step)))
        return events

    def report() -> None:
        if not steps["count"]:
            return
        wall = time.perf_counter() - steps["first"]
        print(f"steps {steps['count']}, {steps['seconds']:.1f} s in steps of {wall:.1f} s since the first")
        for role, (count, seconds, rows) in calls.items():
            print(
                f"  {role}: {count} calls, {seconds:.1f} s, {rows / count:.2f} rows a call, {1e3 * seconds / count:.1f} ms a call"
            )
        outside = steps["seconds"] - sum(seconds for _, seconds, _ in calls.values())
        print(f"  a step outside its graph calls: {1e3 * outside / steps['count']:.2f} ms")
        for kind, (count, spent, most) in copied.items():
            print(f"  prefix-cache {kind}s: in {count} steps, {spent:.2f} s, the most in a step {1e3 * most:.1f} ms")
        print(
            f"  budget {scheduler.budget()}, call cost {scheduler.prefill_cost.fit()}, "
            f"a packed call's added cost {scheduler.added_cost.fit()}"
        )
        ordered = sorted(each)
        p50, p99 = ordered[len(ordered) // 2][0], ordered[int(0.99 * (len(ordered) - 1))][0]
        print(f"  a step with graph calls: p50 {1e3 * p50:.1f} ms, p99 {1e3 * p99:.1f} ms ({p99 / p50:.2f}x)")
        slowest = ordered[int(0.99 * (len(ordered) - 1)) :][::-1][:12]
        print("  its slowest 1%: " + "; ".join(f"{1e3 * s:.1f} ms ({what})" for s, what in slowest))

    scheduler.observer = observe
    if budget is not None:
        scheduler.budget = lambda: Budget(budget, scheduler.prefill_sizes is None, MIN_PREFILL_TOKENS)
    scheduler.step = timed_step
    scheduler.plan = recorded_plan
    atexit.register(report)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    if len(sys.argv) > 4:
        schedule.PACKED_SHARE = float(sys.argv[4])
    fixed = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8472, int(fixed) if fixed else None)
