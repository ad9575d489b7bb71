"""What the loop costs around its graph runs, without a server: a decode step of every row (B rows
decoding greedily) timed as wall time against the time inside ONNX Runtime's run, then the same step
with the graph run replaced by nothing (the loop's Python alone) and by a 128 MiB read (that Python
finding its data out of the caches, as after a real run), then bench-serve's mixed workload
(32 requests, 8 callers, greedy) run on a fresh scheduler in this process: what `llamatrt serve` would
deliver if HTTP cost nothing (compare with `llamatrt bench-serve URL --clients 8 --requests 32`).

Usage: .venv/bin/python benchmarks/loop_overhead.py ARTIFACT [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from typing import Any

import numpy as np

from llamatrt.runtime.backend import torch_threads
from llamatrt.runtime.llm import LLM, load
from llamatrt.runtime.requests import Request
from llamatrt.tools.bench_serve import mixed_prompts

STEPS = 150
COOLING_BYTES = 128 << 20  # more than the host's last-level cache
_COOLING = np.ones(COOLING_BYTES, np.uint8)


class _TimedSession:
    """An ONNX Runtime session whose runs add up their seconds; or, `skip`, a run that does nothing,
    or, `cool`, one that only reads COOLING_BYTES (as a decode step streams its weights, leaving the
    loop's Python to find its data out of the caches)."""

    def __init__(self, session: Any, skip: bool = False, cool: bool = False) -> None:
        self.session, self.skip, self.cool, self.seconds = session, skip, cool, 0.0

    def run_with_iobinding(self, binding: Any) -> None:
        started = time.perf_counter()
        if self.cool:
            int(_COOLING[::64].sum())  # one byte of every cache line
        elif not self.skip:
            self.session.run_with_iobinding(binding)
        self.seconds += time.perf_counter() - started

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def decode_steps(llm: LLM, skip_graph: bool, cool: bool = False) -> tuple[float, float]:
    """ms a step outside the graph run, and inside it, over STEPS steps of every row decoding."""
    scheduler = llm.scheduler
    backend = scheduler.backend
    real = dict(backend.sessions)
    handles = [
        scheduler.submit(Request([100 + b, 7, 8, 9] * 5, max_new_tokens=STEPS + 8, use_eos=False), b)
        for b in range(llm.manifest.batch_size)
    ]
    scheduler.step()  # admits and prefills every row
    scheduler.step()
    timed = {name: _TimedSession(session, skip_graph, cool) for name, session in real.items()}
    backend.sessions = timed
    started = time.perf_counter()
    for _ in range(STEPS):
        scheduler.step()
    wall = time.perf_counter() - started
    backend.sessions = real
    for handle in handles:
        handle.cancel()
    while not scheduler.idle:
        scheduler.step()
    inside = sum(s.seconds for s in timed.values())
    return 1e3 * (wall - inside) / STEPS, 1e3 * inside / STEPS


def served_in_process(llm: LLM, requests: int = 32, callers: int = 8) -> float:
    """Output tokens/s of bench-serve's mixed workload, its callers in threads of this process."""
    scheduler = llm.scheduler
    jobs = iter([(llm.encode(prompt), new) for prompt, new in mixed_prompts(requests)])
    lock, produced = threading.Lock(), [0]

    def caller() -> None:
        while True:
            with lock:
                job = next(jobs, None)
            if job is None:
                return
            done, count = threading.Event(), [0]

            def on_step(step: Any, count: list[int] = count, done: threading.Event = done) -> None:
                count[0] += step.token_id is not None
                if step.finish_reason is not None:
                    done.set()

            scheduler.submit(Request(job[0], max_new_tokens=job[1], use_eos=False), on_step=on_step)
            scheduler.wake_up()
            done.wait()
            with lock:
                produced[0] += count[0]

    stop = threading.Event()
    loop = threading.Thread(target=scheduler.serve_forever, args=(stop,), daemon=True)
    loop.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    stop.set()
    scheduler.wake_up()
    loop.join()
    return produced[0] / seconds


def main(artifact: str, rounds: int) -> None:
    llm = load(artifact, verify=False)
    batch = llm.manifest.batch_size
    with torch_threads(llm.backend.loop_threads):  # as the loop's own drivers run it
        for k in range(rounds):
            outside, inside = decode_steps(llm, skip_graph=False)
            python, _ = decode_steps(llm, skip_graph=True)
            cooled, _ = decode_steps(llm, skip_graph=True, cool=True)
            print(
                f"round {k + 1}: a decode step of {batch} rows: {inside:.2f} ms in the graph run, {outside:.2f} ms "
                f"outside it; the loop's Python alone (no graph run) {python:.2f} ms, after a {COOLING_BYTES >> 20} "
                f"MiB read in the run's place {cooled:.2f} ms"
            )
    llm.close()
    served = []
    for _ in range(rounds):  # a fresh loop each round, as a fresh server: nothing in its prefix cache yet
        with load(artifact, verify=False) as fresh:
            served.append(served_in_process(fresh))
    print(f"bench-serve's mixed workload in-process, 8 callers: {', '.join(f'{s:.1f}' for s in served)} tok/s")
    print(f"median {statistics.median(served):.1f} tok/s")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
