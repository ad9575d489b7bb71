"""Progress over the named steps of long work (export, validate, diff, bench, build): one display.

Work reports each step as it starts by calling a `Progress` with its name. On a terminal that is a
bar whose clock keeps ticking through a long single step (a step like "running transformers" can
take minutes); redirected to a file it is one plain line per step, so logs are not filled with
redraws. Libraries' own bars (transformers' weight loading, GGUF conversion) are silenced while
ours runs, so two bars never interleave.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

Progress = Callable[[str], None]


def no_progress(_: str) -> None:
    """The Progress of work nobody watches."""


def quiet_libraries() -> None:
    """Turn off transformers' and huggingface_hub's own progress bars (idempotent)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


class StepBar:
    """A Progress shown to a person: a ticking bar on a terminal, plain lines elsewhere."""

    TICK_S = 1.0

    def __init__(self, total: int, desc: str, stream: IO[str] | None = None) -> None:
        self.total, self.desc = total, desc
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.done = 0
        self.current: str | None = None
        self.started = self.step_started = time.perf_counter()
        self.bar: Any = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, step: str) -> None:
        if self.current is not None:
            self.done += 1
        self.current, self.step_started = step, time.perf_counter()
        if self.bar is not None:
            self.bar.n = min(self.done, self.total)
            self.bar.set_description_str(f"{self.desc}: {step}")
        else:
            print(
                f"{self.desc}: [{min(self.done + 1, self.total)}/{self.total}] {step} "
                f"({time.perf_counter() - self.started:.1f} s)",
                file=self.stream,
                flush=True,
            )

    def _tick(self) -> None:
        while not self._stop.wait(self.TICK_S):
            self.bar.refresh()

    def __enter__(self) -> StepBar:
        quiet_libraries()
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                desc=self.desc,
                unit="step",
                file=self.stream,
                leave=True,
                bar_format="{desc} {n}/{total} |{bar:20}| {elapsed}",
            )
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        elapsed = time.perf_counter() - self.started
        if self.bar is not None:
            if exc_type is None:  # complete the bar only on success
                self.bar.n = self.total
                self.bar.set_description_str(f"{self.desc}: done")
            self.bar.close()
        elif exc_type is None:
            print(f"{self.desc}: done in {elapsed:.1f} s", file=self.stream, flush=True)
