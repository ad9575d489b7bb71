"""The one generation loop: requests join and leave a running batch (in-flight batching).

A FIFO queue of requests; a request is admitted as soon as a row of the B-row cache is free. Its
prompt is prefilled on that row alone (a batch-1 prefill bound onto the row's slice of the cache),
one prefill call per loop iteration, so the rows already decoding wait at most one prefill chunk
between two of their tokens; every iteration then runs one decode call of all B rows, each at its
own slot and position. A finished or cancelled row is freed at once and refilled before the next
decode. Each request carries its own sampling, seed, stop ids and strings, token budget and
logprobs; its tokens do not depend on which row it got or what else runs (its own seeded
torch.Generator, rows independent in every graph).

`admission="lockstep"` admits only into an empty batch: the classic batch that starts and ends
together, kept as the baseline the benchmark measures in-flight batching against.
"""

from __future__ import annotations

import functools
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llamatrt.base.errors import InputError, LlamatrtError, NumericalError
from llamatrt.runtime.backend import Backend, torch_threads
from llamatrt.runtime.detokenizer import TextStream, TextStreamFactory
from llamatrt.runtime.kv_state import KVState, PrefillPlan, plan_prefill
from llamatrt.runtime.sampling import SamplingParams, sample, token_logprobs, top_logprobs

log = logging.getLogger(__name__)
GREEDY = SamplingParams()
INTERLEAVE = 1.5  # a prefill call between two decode steps may take this many decode steps
MIN_INTERLEAVE_TOKENS = 8


@dataclass(frozen=True)
class Request:
    prompt: Sequence[int]
    max_new_tokens: int = 128
    sampling: SamplingParams = GREEDY
    stop_ids: frozenset[int] = frozenset()  # besides the scheduler's EOS ids (unless use_eos is False)
    stop_strings: tuple[str, ...] = ()
    use_eos: bool = True
    logprobs: bool = False
    top_logprobs: int = 0  # the N most likely alternatives' logprobs at each step
    forced: Sequence[int] | None = None  # teacher forcing: these tokens are fed, never sampled; logits kept
    fit: str = "refuse"  # prompt + max_new_tokens beyond a row: "refuse" it, or "cap" (finish_reason "length")


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
    logits: torch.Tensor | None = None  # (vocab,) for forced requests
    error: str | None = None  # with finish_reason "error": what failed (this request alone ended)
    text: str = ""  # text released by this step (runtime.detokenizer): the request's text is their sum
    kept: int | None = None  # on a step ended by a stop string: the tokens whose text lies before it


class Handle:
    """A submitted request. Its steps arrive on `steps()` (from any thread) or through `on_step`."""

    def __init__(self, request: Request, index: int, on_step: Callable[[Step], None] | None) -> None:
        self.request, self.index, self.on_step = request, index, on_step
        self.submitted = time.perf_counter()
        self.events: queue.SimpleQueue[Step] = queue.SimpleQueue()
        self.done = threading.Event()
        self.cancel_requested = False

    def cancel(self) -> None:
        """Free the request's row at the next step (or drop it from the queue); others are unaffected."""
        self.cancel_requested = True

    def steps(self, timeout: float | None = None) -> Iterator[Step]:
        """Steps as they come, ending with the final one (blocks; the loop runs in another thread)."""
        while True:
            step = self.events.get(timeout=timeout)
            yield step
            if step.finish_reason is not None:
                return

    def _emit(self, step: Step) -> None:
        self.events.put(step)
        if self.on_step is not None:
            try:
                self.on_step(step)
            except RuntimeError:  # its event loop is closed: nobody reads this request any more
                self.cancel_requested = True
        if step.finish_reason is not None:
            self.done.set()


@dataclass
class _Row:
    handle: Handle
    plan: PrefillPlan
    windows: deque[tuple[int, int]]
    generator: torch.Generator
    seen: torch.Tensor | None  # (vocab,) bool: tokens seen, for the repetition penalty
    fed: int = 0  # tokens of this request written to the cache (prompt, then fed-back tokens)
    text: TextStream | None = None  # the request's text, when the loop has a tokenizer
    generated: list[int] = field(default_factory=list)
    last_token: int = 0

    @property
    def prompt(self) -> Sequence[int]:
        return self.handle.request.prompt

    @property
    def next_slot(self) -> int:
        return self.plan.pad + self.fed


class LoopFailed(LlamatrtError):
    """The loop itself stopped: nothing more can run in this process."""


class Scheduler:
    def __init__(
        self, backend: Backend, stop_ids: Iterable[int] = (), pad_id: int = 0, text: TextStreamFactory | None = None,
        admission: str = "continuous",
    ) -> None:  # fmt: skip
        if admission not in ("continuous", "lockstep"):
            raise InputError(f"unknown admission {admission!r}; use continuous or lockstep")
        self.backend, self.manifest = backend, backend.manifest
        self.eos_ids = frozenset(stop_ids)
        self.pad_id, self.text_stream, self.admission = pad_id, text, admission
        self.kv = KVState(backend)
        self.rows: list[_Row | None] = [None] * self.manifest.batch_size
        self.queue: deque[Handle] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.decode_graph = backend.graph("decode")
        self.prefill_sizes = backend.seq_sizes("prefill", batch=1)
        self.prefill_chunk = max(self.prefill_sizes) if self.prefill_sizes else self.manifest.prefill_chunk
        self.decode_seconds: deque[float] = deque(maxlen=100_000)  # how long each recent decode call took
        self._decode_step_s: float | None = None  # running averages, for sizing interleaved prefill calls
        self._prefill_token_s: float | None = None
        self.failed: str | None = None  # why the loop stopped for good; submit refuses from then on
        # a server ends only the requests a failure belongs to; a caller driving `run` gets the exception
        self.isolate_failures = False

    # --- submitting -------------------------------------------------------------------------------

    def check(self, request: Request, index: int = 0) -> Request:
        """Validate at the edge; returns the request to run (capped where it asks for that)."""
        request.sampling.checked()
        vocab, capacity = self.manifest.config.vocab_size, self.manifest.max_cache_len
        prompt = request.prompt
        if len(prompt) == 0:
            raise InputError(f"prompt {index} is empty; give it at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InputError(f"prompt {index} has a token id outside the vocabulary [0, {vocab}); encode it with "
                             "this artifact's tokenizer")  # fmt: skip
        if any(not s for s in request.stop_strings):
            raise InputError("a stop string is empty (it would stop every row at once); give non-empty --stop strings")
        if any(not 0 <= t < vocab for t in request.stop_ids):
            raise InputError(f"a stop id is outside the vocabulary [0, {vocab}); give ids of this artifact's tokenizer")
        if request.top_logprobs < 0 or request.top_logprobs > 20:
            raise InputError(f"top logprobs {request.top_logprobs} must be in [0, 20]; ask for at most 20 alternatives")
        steps = len(request.forced) if request.forced is not None else request.max_new_tokens
        if steps < 1:
            raise InputError(f"max new tokens {steps} must be >= 1; ask for at least one token")
        pad = plan_prefill(len(prompt), self.prefill_sizes, self.prefill_chunk).pad
        room = capacity - pad - len(prompt) + 1  # tokens it can still get: the last one is never written
        if room < 1:
            raise InputError(f"prompt {index} has {len(prompt)} tokens, the cache holds {capacity}; shorten it or "
                             "re-export with a larger --max-seq-len")  # fmt: skip
        if steps > room and (request.fit != "cap" or request.forced is not None):
            raise InputError(
                f"prompt {index} ({len(prompt)} tokens) plus {steps} new tokens does not fit the cache of "
                f"{capacity}; ask for at most {room} new tokens, shorten the prompt or re-export with a larger "
                "--max-seq-len"
            )
        return request

    def submit(self, request: Request, index: int = 0, on_step: Callable[[Step], None] | None = None) -> Handle:
        """Queue a request (FIFO). Raises InputError if it can never run."""
        handle = Handle(self.check(request, index), index, on_step)
        with self.wake:
            if self.failed is not None:
                raise LoopFailed(f"{self.failed}; restart the server")
            self.queue.append(handle)
            self.wake.notify_all()
        return handle

    @property
    def idle(self) -> bool:
        return not self.queue and all(r is None for r in self.rows)

    @property
    def active_rows(self) -> int:
        return sum(r is not None for r in self.rows)

    # --- running ----------------------------------------------------------------------------------

    def run(self, handles: Sequence[Handle] | None = None) -> Iterator[Step]:
        """Drive the loop in this thread until `handles` (default: everything queued) are done,
        yielding their steps as they come."""
        waiting = set(handles) if handles is not None else None
        with torch_threads(self.backend.loop_threads):
            while not (self.idle if waiting is None else all(h.done.is_set() for h in waiting)):
                yield from self.step()

    def serve_forever(self, stop: threading.Event) -> None:
        """The loop of a server: step while there is work, sleep until a request arrives. A failure
        that belongs to some requests ends those (finish_reason "error") and the loop goes on; a
        failure of the loop itself ends every request, refuses new ones (`failed`) and returns."""
        self.isolate_failures = True
        with torch_threads(self.backend.loop_threads):
            try:
                while not stop.is_set():
                    with self.wake:
                        while self.idle and not stop.is_set():
                            self.wake.wait(timeout=0.5)
                    if not stop.is_set():
                        self.step()
            except BaseException as e:  # the loop's own failure: everyone is told, the server says so
                self.failed = f"the generation loop stopped ({type(e).__name__}: {str(e)[:200]})"
                log.error("%s", self.failed, exc_info=True)
                self._fail_all(self.failed)

    def step(self) -> list[Step]:
        """One iteration: drop cancelled requests, admit into free rows, one prefill call, one decode."""
        events: list[Step] = []
        self._drop_cancelled(events)
        self._admit()
        prefilling = [b for b, r in enumerate(self.rows) if r is not None and r.windows]
        if prefilling:
            b = min(prefilling, key=lambda b: self.rows[b].handle.submitted)  # type: ignore[union-attr]
            self._isolated(lambda: self._prefill_window(b, events), [b], events)
        decoding = [b for b, r in enumerate(self.rows) if r is not None and not r.windows]
        if decoding:
            self._isolated(lambda: self._decode(events), decoding, events)
        return events

    def _isolated(self, call: Callable[[], None], rows: list[int], events: list[Step]) -> None:
        """Run one graph call (and what follows it); if it raises, end the requests of `rows` with the
        error and free their rows. Their cache slots are rewritten by whatever is admitted next."""
        try:
            call()
        except Exception as e:
            if not self.isolate_failures:
                raise
            for b in rows:
                row = self.rows[b]
                if row is not None and not row.handle.done.is_set():
                    self.rows[b] = None
                    self._finish(row.handle, None, "error", events, error=_describe(e))

    def _fail_all(self, error: str) -> None:
        events: list[Step] = []
        with self.lock:
            waiting, self.queue = list(self.queue), deque()
        for handle in waiting:
            self._finish(handle, None, "error", events, error=error)
        for b, row in enumerate(self.rows):
            if row is not None:
                self.rows[b] = None
                if not row.handle.done.is_set():
                    self._finish(row.handle, None, "error", events, error=error)

    def _drop_cancelled(self, events: list[Step]) -> None:
        with self.lock:
            for handle in [h for h in self.queue if h.cancel_requested]:
                self.queue.remove(handle)
                self._finish(handle, None, "cancelled", events)
        for b, row in enumerate(self.rows):
            if row is not None and row.handle.cancel_requested:
                self.rows[b] = None
                self._finish(row.handle, None, "cancelled", events, text=_rest(row))

    def _admit(self) -> None:
        with self.lock:
            if self.admission == "lockstep" and any(r is not None for r in self.rows):
                return
            for b in range(len(self.rows)):
                if self.rows[b] is None and self.queue:
                    self.rows[b] = self._new_row(b, self.queue.popleft())

    def _new_row(self, b: int, handle: Handle) -> _Row:
        request = handle.request
        plan = plan_prefill(len(request.prompt), self.prefill_sizes, self.prefill_chunk)
        self.kv.reset_row(b, plan.pad)
        seed = request.sampling.seed if request.sampling.seed is not None else random.SystemRandom().randrange(2**63)
        seen = None
        if request.sampling.repetition_penalty != 1.0:
            seen = torch.zeros(self.manifest.config.vocab_size, dtype=torch.bool)
            seen[torch.tensor(list(request.prompt))] = True
        text = None if self.text_stream is None else self.text_stream(request.stop_strings)
        return _Row(handle, plan, deque(plan.windows), torch.Generator().manual_seed(seed), seen, text=text)

    def _interleave_tokens(self) -> int:
        """Tokens of one prefill call while other rows decode, on a graph that takes any number: what
        fits in INTERLEAVE x a decode step, from the running averages of both (so a decoding row
        waits about (1 + INTERLEAVE) decode steps between two tokens, on any host)."""
        if self._prefill_token_s is None or self._decode_step_s is None:
            return MIN_INTERLEAVE_TOKENS
        tokens = int(INTERLEAVE * self._decode_step_s / self._prefill_token_s)
        return max(MIN_INTERLEAVE_TOKENS, min(tokens, self.prefill_chunk))

    def _prefill_window(self, b: int, events: list[Step]) -> None:
        row = self.rows[b]
        assert row is not None
        start, size = row.windows.popleft()
        decoding = any(r is not None and not r.windows and r is not row for r in self.rows)
        if self.prefill_sizes is None and decoding and size > (limit := self._interleave_tokens()):
            row.windows.appendleft((start + limit, size - limit))  # the rest of this window, next time
            size = limit
        slots = torch.arange(start, start + size)  # (size,)
        tokens = [self.pad_id] * row.plan.pad + list(row.prompt)
        ids = torch.tensor(tokens[start : start + size], dtype=torch.long)
        positions = (slots - row.plan.pad).clamp(min=0)  # padding slots at position 0, masked anyway
        graph = self.backend.graph("prefill", 1, None if self.prefill_sizes is None else size)
        started = time.perf_counter()
        outputs = self.backend.run(graph.name, self.kv.prefill_feeds(graph, b, ids, positions, start))
        self.kv.take(outputs, row=b)
        self._prefill_token_s = _average(self._prefill_token_s, (time.perf_counter() - started) / size)
        if not row.windows:  # the prompt is in the cache: its last position's logits give the first token
            row.fed = len(row.prompt)
            logits = _finite(outputs["logits"], graph.name)[:1]
            self._advance(b, logits[0], events, self._sample([b], logits).get(b))

    def _decode(self, events: list[Step]) -> None:
        batch = len(self.rows)
        tokens = torch.full((batch,), self.pad_id, dtype=torch.long)
        positions = torch.zeros(batch, dtype=torch.long)
        slots = torch.zeros(batch, dtype=torch.long)  # free rows write slot 0, rewritten by their next prefill
        decoding = []
        for b, row in enumerate(self.rows):
            if row is None:
                continue
            if row.windows:  # still prefilling: write where its next prefill call will write anyway
                slots[b] = row.windows[0][0]
                continue
            tokens[b], positions[b], slots[b] = row.last_token, row.fed, row.next_slot
            decoding.append(b)
        started = time.perf_counter()
        outputs = self.backend.run(
            self.decode_graph.name, self.kv.decode_feeds(self.decode_graph, tokens, positions, slots)
        )
        self.kv.take(outputs)
        self.decode_seconds.append(time.perf_counter() - started)
        self._decode_step_s = _average(self._decode_step_s, self.decode_seconds[-1])
        logits = _finite(outputs["logits"], self.decode_graph.name)
        for b in decoding:
            self.rows[b].fed += 1  # type: ignore[union-attr]
        sampled = self._sample(decoding, logits[decoding])
        for b in decoding:
            self._isolated(functools.partial(self._advance, b, logits[b], events, sampled.get(b)), [b], events)

    def _sample(self, rows: list[int], logits: torch.Tensor) -> dict[int, int]:
        """The next token of every sampling row among `rows`, in one batched call (forced rows feed
        their given tokens instead). `logits` is (len(rows), vocab), in the order of `rows`."""
        at = [k for k, b in enumerate(rows) if self.rows[b].handle.request.forced is None]  # type: ignore[union-attr]
        if not at:
            return {}
        chosen = [rows[k] for k in at]
        running = [self.rows[b] for b in chosen]
        seen = None
        if any(r.seen is not None for r in running):  # type: ignore[union-attr]
            vocab = logits.shape[-1]
            seen = torch.stack([r.seen if r.seen is not None else torch.zeros(vocab, dtype=torch.bool)  # type: ignore[union-attr]
                                for r in running])  # fmt: skip
        tokens = sample(logits[at], [r.handle.request.sampling for r in running],  # type: ignore[union-attr]
                        [r.generator for r in running], seen)  # type: ignore[union-attr]  # fmt: skip
        return dict(zip(chosen, tokens.tolist(), strict=True))

    def _advance(self, b: int, logits: torch.Tensor, events: list[Step], token: int | None) -> None:
        """Row b's next token (sampled from `logits` (vocab,), or its forced one): emit it, end the
        request or keep decoding."""
        row = self.rows[b]
        assert row is not None
        request, handle = row.handle.request, row.handle
        elapsed = time.perf_counter() - handle.submitted
        if request.forced is not None:
            token = int(request.forced[len(row.generated)])
            row.generated.append(token)
            done = len(row.generated) == len(request.forced)
            self._emit(
                handle,
                Step(handle.index, token, None, "length" if done else None, elapsed, logits=logits.clone()),
                events,
            )
            return self._continue_or_free(b, token, done)
        assert token is not None
        logits = logits[None]  # (1, vocab)
        logprob = float(token_logprobs(logits, torch.tensor([token]))[0]) if request.logprobs else None
        top = top_logprobs(logits[0], request.top_logprobs) if request.top_logprobs else ()
        stop_ids = request.stop_ids | (self.eos_ids if request.use_eos else frozenset())
        if token in stop_ids:
            self.rows[b] = None
            return self._finish(handle, token, "stop", events, elapsed, _rest(row))
        row.generated.append(token)
        if row.seen is not None:
            row.seen[token] = True
        text, stop = row.text.push(token) if row.text is not None else ("", None)
        room = self.manifest.max_cache_len - row.next_slot  # slots left to write the next tokens into
        reason = "stop" if stop else ("length" if len(row.generated) >= request.max_new_tokens or room < 1 else None)
        if reason == "length":
            text += _rest(row)
        kept = row.text.kept if stop and row.text is not None else None
        self._emit(handle, Step(handle.index, token, logprob, reason, elapsed, stop, top, text=text, kept=kept), events)
        self._continue_or_free(b, token, reason is not None)

    def _continue_or_free(self, b: int, token: int, done: bool) -> None:
        row = self.rows[b]
        assert row is not None
        if done:
            self.rows[b] = None
        else:
            row.last_token = token

    def _emit(self, handle: Handle, step: Step, events: list[Step]) -> None:
        handle._emit(step)
        events.append(step)

    def _finish(
        self, handle: Handle, stop_id: int | None, reason: str, events: list[Step], elapsed: float | None = None,
        text: str = "", error: str | None = None,
    ) -> None:  # fmt: skip
        elapsed = time.perf_counter() - handle.submitted if elapsed is None else elapsed
        self._emit(handle, Step(handle.index, None, None, reason, elapsed, stop_id, text=text, error=error), events)


def _rest(row: _Row) -> str:
    """The text a request's stream still holds, released at its end."""
    return "" if row.text is None else row.text.flush()


def _describe(error: Exception) -> str:
    """One line for a client: llamatrt's own errors say what to do; anything else is named."""
    if isinstance(error, LlamatrtError):
        return str(error)
    return f"generation failed ({type(error).__name__}: {str(error)[:200]})"


def _average(previous: float | None, value: float, weight: float = 0.2) -> float:
    return value if previous is None else (1 - weight) * previous + weight * value


def _finite(logits: torch.Tensor, graph: str) -> torch.Tensor:
    """The next-token logits (rows, vocab) on the CPU in fp32, or a one-line error: a NaN is a broken
    artifact, never a token. Full-logits graphs give (rows, seq, vocab): the last position is next."""
    logits = logits.float().cpu()
    if logits.dim() == 3:
        logits = logits[:, -1]
    if not torch.isfinite(logits).all():
        rows = sorted({int(r) for r in (~torch.isfinite(logits)).nonzero()[:, 0]})
        raise NumericalError(f"the {graph} graph produced NaN/inf logits (rows {rows}); the artifact is damaged: "
                             "run `llamatrt verify` on it, or re-export")  # fmt: skip
    return logits
