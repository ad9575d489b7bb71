"""Where a served loop's time goes: `llamatrt serve` in this process with an observer on its
scheduler. On Ctrl-C (or SIGTERM) it prints the steps, the prefill and decode graph calls (count,
seconds, rows a call, ms a call), the Python time of a step outside its graph calls, and the
prefill budget and call cost the scheduler has learnt. Drive it with `llamatrt bench-serve`. A
BUDGET (tokens) replaces the learnt budget by a fixed one, to measure what the budget's size does.

Usage: .venv/bin/python benchmarks/serve_step_profile.py ARTIFACT [PORT] [BUDGET]
       .venv/bin/llamatrt bench-serve http://127.0.0.1:PORT --clients 8 --requests 32   (another shell)
"""

from __future__ import annotations

import atexit
import sys
import time
from collections import defaultdict
from pathlib import Path

import uvicorn

from llamatrt.runtime.schedule import MIN_PREFILL_TOKENS, Budget
from llamatrt.server.app import create_app
from llamatrt.server.engine import EngineConfig


def main(artifact: str, port: int, budget: int | None) -> None:
    app = create_app(EngineConfig(Path(artifact), verify=False))
    scheduler = app.state.engine.scheduler
    calls: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])  # role -> calls, seconds, rows
    steps = {"count": 0, "seconds": 0.0, "first": 0.0}

    def observe(role: str, seconds: float, rows: int) -> None:
        calls[role][0] += 1
        calls[role][1] += seconds
        calls[role][2] += rows

    step = scheduler.step

    def timed_step() -> object:
        started = time.perf_counter()
        steps["first"] = steps["first"] or started
        events = step()
        steps["count"] += 1
        steps["seconds"] += time.perf_counter() - started
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
        print(f"  budget {scheduler.budget()}, call cost {scheduler.prefill_cost.fit()}")

    scheduler.observer = observe
    if budget is not None:
        scheduler.budget = lambda: Budget(budget, scheduler.prefill_sizes is None, MIN_PREFILL_TOKENS)
    scheduler.step = timed_step
    atexit.register(report)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8472, int(sys.argv[3]) if len(sys.argv) > 3 else None)
