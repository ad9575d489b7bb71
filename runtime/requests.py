"""What a caller hands the loop and what it gets back: a Request, its Steps, and the Handle that
carries them between threads (runtime.scheduler runs the loop)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Literal

from llamatrt.runtime.sampling import SamplingParams
from llamatrt.runtime.structured import Grammar

GREEDY = SamplingParams()
Fit = Literal["refuse", "cap"]


@dataclass(frozen=True)
class Request:
    prompt: Sequence[int]
    _: KW_ONLY
    max_new_tokens: int = 128
    sampling: SamplingParams = GREEDY
    stop_ids: frozenset[int] = frozenset()  # besides the loop's EOS ids (unless use_eos is False)
    stop_strings: tuple[str, ...] = ()
    use_eos: bool = True
    logprobs: bool = False
    top_logprobs: int = 0  # the N most likely alternatives' logprobs at each step
    # prompt + max_new_tokens beyond a row: "refuse" it when submitted, or "cap" it (finish_reason "length")
    fit: Fit = "refuse"
    grammar: Grammar | None = None  # the answer held to it while generated (runtime.structured)


@dataclass(frozen=True)
class Step:
    """One event of one request: a new token, and/or its end."""

    index: int  # the request's index (given at submit)
    token_id: int | None  # None on a final step ended by a stop id (stop ids are not emitted)
    logprob: float | None
    finish_reason: str | None  # None while running, then "stop", "length", "cancelled" or "error"
    elapsed_s: float  # since the request was submitted (its first step: the time to first token)
    stop: str | int | None = None  # the stop string or stop id that ended it
    top_logprobs: tuple[tuple[int, float], ...] = ()
    error: str | None = None  # with finish_reason "error": what failed (this request alone ended)
    text: str = ""  # text released by this step (runtime.detokenizer): the request's text is their sum
    kept: int | None = None  # on a step ended by a stop string: the tokens whose text lies before it
    cached_tokens: int = 0  # prompt tokens its row took from the prefix cache instead of prefilling


class Handle:
    """A submitted request. Its steps arrive on `steps()` (from any thread) or through `on_step`."""

    def __init__(
        self,
        request: Request,
        index: int,
        on_step: Callable[[Step], None] | None,
        cancelled: threading.Event | None = None,
    ) -> None:
        """`cancelled`: set when this request is cancelled (the loop's cue to look through its queue)."""
        self.request, self.index, self.on_step = request, index, on_step
        self.submitted = time.perf_counter()
        self.events: queue.SimpleQueue[Step] = queue.SimpleQueue()
        self.done = threading.Event()
        self.cancel_requested = False
        self.cancelled = cancelled
        self.prefix_keys: list[bytes] | None = None  # its prompt's block keys (runtime.prefix_cache), once

    def cancel(self) -> None:
        """Free the request's row at the next step (or drop it from the queue); others are unaffected."""
        self.cancel_requested = True
        if self.cancelled is not None:  # after the flag: a loop that sees the cue finds the flag set
            self.cancelled.set()

    def steps(self, timeout: float | None = None) -> Iterator[Step]:
        """Steps as they come, ending with the final one (blocks; the loop runs in another thread)."""
        while True:
            step = self.events.get(timeout=timeout)
            yield step
            if step.finish_reason is not None:
                return

    def emit(self, step: Step) -> None:
        self.events.put(step)
        if self.on_step is not None:
            try:
                self.on_step(step)
            except RuntimeError:  # its event loop is closed: nobody reads this request any more
                self.cancel()
        if step.finish_reason is not None:
            self.done.set()
