"""The one generation loop: requests join and leave a running batch (in-flight batching).

Each step asks runtime.schedule for a plan (which waiting requests take which free rows, which rows
prefill how many tokens within the step's budget, which rows decode) and applies it: its prefill
calls, each bound onto its row's slice of the B-row cache, then one decode call of the rows up to
the last decoding one, each at its own slot and position — or, on a graph that packs tokens, all of
it as one call (`_packed_call`; what calls cost is learnt as they run: runtime.prefill_cost);
a row admitted with a prompt whose beginning was computed before gets it from the prefix cache
(runtime.prefix_cache) by a copy and prefills only the rest, and the full blocks of what its row
computed are kept there;
the rows' next tokens are chosen in one batched call (runtime.sampling), stop ids end a request
here and stop strings in its text stream (runtime.detokenizer). A finished or cancelled row is
freed at once and refilled at the next step. Each request carries its own sampling, seed, stop ids
and strings, token budget and logprobs; its tokens do not depend on which row it got or what else
runs (its own seeded torch.Generator, rows independent in every graph).

What the tools need is passed in, not built in: an admission policy (the bench's lockstep batches),
a token choice (teacher forcing in the diff), an observer of each graph call's time (the bench).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from llamatrt.base.artifact.manifest import GraphSpec
from llamatrt.base.errors import InputError, LlamatrtError, NumericalError
from llamatrt.runtime.backend import Backend, torch_threads
from llamatrt.runtime.detokenizer import TextStream, TextStreamFactory
from llamatrt.runtime.kv_state import KVState, PrefillPlan, plan_prefill, usable_cached
from llamatrt.runtime.prefill_cost import AddedCost, PrefillCost
from llamatrt.runtime.prefix_cache import PrefixCache, block_keys
from llamatrt.runtime.requests import GREEDY, Handle, Request, Step
from llamatrt.runtime.sampling import sample, token_logprobs, top_logprobs
from llamatrt.runtime.schedule import IN_FLIGHT, Admission, Budget, Plan, Prefill, RowState, decide, prefill_budget
from llamatrt.runtime.structured import GrammarEngine, PendingMasks

# Prompt blocks a step copies into the prefix cache (each a copy of every layer's slots of a block's tokens)
REMEMBERED_BLOCKS_PER_STEP = 4

__all__ = ["GREEDY", "Handle", "LoopFailed", "Request", "Scheduler", "Step"]
log = logging.getLogger(__name__)


@dataclass
class Row:
    """A request in a row of the cache: what the loop keeps of it between steps."""

    handle: Handle
    plan: PrefillPlan
    windows: deque[tuple[int, int]]
    generator: torch.Generator
    seen: torch.Tensor | None  # (vocab,) bool: tokens seen, for the repetition penalty
    fed: int = 0  # tokens of this request written to the cache (prompt, then fed-back tokens)
    text: TextStream | None = None  # the request's text, when the loop has a tokenizer
    generated: list[int] = field(default_factory=list)
    last_token: int = 0
    cached: int = 0  # prompt tokens copied from the prefix cache
    matcher: Any = None  # the request's grammar's state (runtime.structured), if it has one
    remembered: int = 0  # blocks from slot 0 that the prefix cache has (or had) from this row

    @property
    def written(self) -> list[int]:
        """The tokens in this row's slots, from its first: the prompt, then the generated tokens fed back."""
        return [*self.request.prompt, *self.generated[: self.fed - len(self.request.prompt)]]

    @property
    def request(self) -> Request:
        return self.handle.request

    @property
    def next_slot(self) -> int:
        return self.plan.pad + self.fed


class TokenChoice(Protocol):
    """Chooses the next token of each row in `rows` from its logits (len(rows), vocab)."""

    def __call__(self, rows: Sequence[Row], logits: torch.Tensor) -> list[int]: ...


def sample_rows(rows: Sequence[Row], logits: torch.Tensor) -> list[int]:
    """Each row's own sampling parameters, generator and seen tokens, in one batched call."""
    seen = None
    if any(r.seen is not None for r in rows):
        blank = torch.zeros(logits.shape[-1], dtype=torch.bool)
        seen = torch.stack([r.seen if r.seen is not None else blank for r in rows])
    return sample(logits, [r.request.sampling for r in rows], [r.generator for r in rows], seen).tolist()


class Observer(Protocol):
    """Told how long each graph call took (role "prefill", "decode", or "mixed" for a packed call of
    both) and how many rows it ran (a mixed or prefill call: the rows it gave a next token)."""

    def __call__(self, role: str, seconds: float, rows: int) -> None: ...


class LoopFailed(LlamatrtError):
    """The loop itself stopped: nothing more can run in this process."""


class Scheduler:
    def __init__(
        self,
        backend: Backend,
        stop_ids: Iterable[int] = (),
        pad_id: int = 0,
        text: TextStreamFactory | None = None,
        *,
        admission: Admission = IN_FLIGHT,
        choose: TokenChoice = sample_rows,
        observer: Observer | None = None,
        prefix_cache: PrefixCache | None = None,
        grammars: GrammarEngine | None = None,
    ) -> None:
        self.backend, self.manifest = backend, backend.manifest
        self.prefix = prefix_cache if prefix_cache is not None and prefix_cache.enabled else None
        self.grammars = grammars  # constrains the rows whose request has a grammar
        self.eos_ids = frozenset(stop_ids)
        self.pad_id, self.text_stream = pad_id, text
        self.admission, self.choose, self.observer = admission, choose, observer
        self.kv = KVState(backend)
        self.rows: list[Row | None] = [None] * self.manifest.batch_size
        self.queue: deque[Handle] = deque()
        self.queue_cancelled = threading.Event()  # some handle was cancelled: look through the queue once
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.driving = threading.Lock()  # one driver at a time: `run` or `serve_forever`
        self.decode_graph = backend.graph("decode")
        # a graph that takes rows of different token counts (exporter.ort_packing): the step's decode
        # rows and prefill slices then run as one call, which reads the weights once for both
        self.packed_graph = self.decode_graph if self.decode_graph.packs_tokens else None
        self._decode_graphs: dict[int, GraphSpec] = {}  # rows in the call -> the graph that runs them
        self.prefill_sizes = backend.seq_sizes("prefill", batch=1)
        self.prefill_chunk = max(self.prefill_sizes) if self.prefill_sizes else self.manifest.prefill_chunk
        self._decode_step_s: float | None = None  # a running average, for sizing interleaved prefill calls
        self._decode_call_s: dict[int, float] = {}  # rows in a decode call -> its running average
        self.prefill_cost = PrefillCost()
        self.added_cost = AddedCost()  # what prompt tokens add to a packed decode call
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
            raise InputError(
                f"prompt {index} has a token id outside the vocabulary [0, {vocab}); encode it with this "
                "artifact's tokenizer"
            )
        if any(not s for s in request.stop_strings):
            raise InputError("a stop string is empty (it would stop every row at once); give non-empty --stop strings")
        if any(not 0 <= t < vocab for t in request.stop_ids):
            raise InputError(f"a stop id is outside the vocabulary [0, {vocab}); give ids of this artifact's tokenizer")
        if request.grammar is not None and self.grammars is None:
            raise InputError(
                "this loop has no grammar engine; load the artifact with llamatrt.load to constrain answers"
            )
        if request.top_logprobs < 0 or request.top_logprobs > 20:
            raise InputError(f"top logprobs {request.top_logprobs} must be in [0, 20]; ask for at most 20 alternatives")
        steps = request.max_new_tokens
        if steps < 1:
            raise InputError(f"max new tokens {steps} must be >= 1; ask for at least one token")
        pad = plan_prefill(len(prompt), self.prefill_sizes, self.prefill_chunk).pad
        room = capacity - pad - len(prompt) + 1  # tokens it can still get: the last one is never written
        if room < 1:
            raise InputError(
                f"prompt {index} has {len(prompt)} tokens, the cache holds {capacity}; shorten it or re-export "
                "with a larger --max-seq-len"
            )
        if steps > room and request.fit != "cap":
            raise InputError(
                f"prompt {index} ({len(prompt)} tokens) plus {steps} new tokens does not fit the cache of "
                f"{capacity}; ask for at most {room} new tokens, shorten the prompt or re-export with a larger "
                "--max-seq-len"
            )
        return request

    def submit(self, request: Request, index: int = 0, on_step: Callable[[Step], None] | None = None) -> Handle:
        """Queue a request (FIFO). Raises InputError if it can never run."""
        handle = Handle(self.check(request, index), index, on_step, self.queue_cancelled)
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

    @property
    def waiting(self) -> int:
        """Requests in the queue, not yet in a row."""
        return len(self.queue)

    @property
    def free_rows(self) -> int:
        return len(self.rows) - self.active_rows

    def wake_up(self) -> None:
        """Wake a sleeping `serve_forever` (to see its stop event)."""
        with self.wake:
            self.wake.notify_all()

    # --- driving ----------------------------------------------------------------------------------

    def run(self, handles: Sequence[Handle] | None = None) -> Iterator[Step]:
        """Drive the loop in this thread until `handles` (default: everything queued) are done,
        yielding their steps as they come."""
        waiting = set(handles) if handles is not None else None
        with self._driver(), torch_threads(self.backend.loop_threads):
            while not (self.idle if waiting is None else all(h.done.is_set() for h in waiting)):
                yield from self.step()

    def serve_forever(self, stop: threading.Event) -> None:
        """The loop of a server: step while there is work, sleep until a request arrives. A failure
        that belongs to some requests ends those (finish_reason "error") and the loop goes on; a
        failure of the loop itself ends every request, refuses new ones (`failed`) and returns."""
        self.isolate_failures = True
        with self._driver(), torch_threads(self.backend.loop_threads):
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

    @contextlib.contextmanager
    def choosing(self, choose: TokenChoice) -> Iterator[None]:
        """Choose the tokens of what runs inside with `choose` (the diff's teacher forcing), then
        go back to sampling. Only between runs: a running request keeps one way of choosing."""
        if not self.idle:
            raise InputError("the loop has requests running; change how it chooses tokens between runs")
        previous, self.choose = self.choose, choose
        try:
            yield
        finally:
            self.choose = previous

    def _driver(self) -> _Driving:
        return _Driving(self.driving)

    # --- one step: decide, then apply -------------------------------------------------------------

    def plan(self) -> Plan:
        """This step's decision (runtime.schedule) from the rows and the queue's head."""
        rows = [None if r is None else RowState(r.handle.submitted, tuple(r.windows)) for r in self.rows]
        with self.lock:
            head = list(itertools.islice(self.queue, rows.count(None)))
        waiting = [RowState(h.submitted, tuple(self._prefill_plan(h.request, self._cached(h)).windows)) for h in head]
        return decide(rows, waiting, self.admission, self.budget())

    def budget(self) -> Budget:
        """The step's prefill tokens while rows decode, from what this loop's calls cost."""
        packed = self.packed_graph is not None
        cost = self.added_cost.fit() if packed else self.prefill_cost.fit()
        return prefill_budget(cost, self._decode_step_s, cut=self.prefill_sizes is None, packed=packed)

    def step(self) -> list[Step]:
        """One iteration: drop cancelled requests, then apply the plan: admit, its prefill calls in
        order, one decode call; then a few prompt blocks go to the prefix cache."""
        events: list[Step] = []
        self._drop_cancelled(events)
        plan = self.plan()
        with self.lock:
            for b in plan.admit:
                self.rows[b] = self._new_row(b, self.queue.popleft())
        if self._packs(plan):
            self._packed_step(plan, events)
        else:
            for prefill in plan.prefill:
                if self.rows[prefill.row] is not None:  # (an earlier call of this step may have failed it)
                    self._isolated(functools.partial(self._prefill, prefill, events), [prefill.row], events)
            decoding = [b for b in plan.decode if (row := self.rows[b]) is not None and not row.windows]
            if decoding:
                self._isolated(lambda: self._decode(decoding, events), decoding, events)
        self._remember_pending(events)
        return events

    def _packs(self, plan: Plan) -> bool:
        """Whether the step runs as one packed call: a graph that packs tokens, and prefill beside
        decode rows or on several rows (a step of one kind on one row is its plain call)."""
        if self.packed_graph is None or not plan.prefill:
            return False
        decoding = any(not row.windows for b in plan.decode if (row := self.rows[b]) is not None)
        return decoding or len({call.row for call in plan.prefill}) > 1

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
        """Cancelled requests leave their rows, and the queue, which is looked through only after a
        cancel: a step's own work never grows with the number of requests waiting."""
        if self.queue_cancelled.is_set():
            self.queue_cancelled.clear()  # before looking: a cancel after this sets it again
            with self.lock:
                for handle in [h for h in self.queue if h.cancel_requested]:
                    self.queue.remove(handle)
                    self._finish(handle, None, "cancelled", events)
        for b, row in enumerate(self.rows):
            if row is not None and row.handle.cancel_requested:
                self.rows[b] = None
                self._finish(row.handle, None, "cancelled", events, text=_rest(row))

    def _prefill_plan(self, request: Request, cached: int = 0) -> PrefillPlan:
        return plan_prefill(len(request.prompt), self.prefill_sizes, self.prefill_chunk, cached)

    # --- the prefix cache -------------------------------------------------------------------------

    def _keys(self, handle: Handle) -> list[bytes]:
        """The block keys of a request's prompt, worked out once."""
        assert self.prefix is not None
        if handle.prefix_keys is None:
            handle.prefix_keys = block_keys(handle.request.prompt, self.prefix.block_size)
        return handle.prefix_keys

    def _cached(self, handle: Handle) -> int:
        """Prompt tokens of `handle` the prefix cache holds now and its prefill plan can start after."""
        if self.prefix is None:
            return 0
        found = self.prefix.longest(self._keys(handle)) * self.prefix.block_size
        return usable_cached(len(handle.request.prompt), found, self.prefix.block_size, self.prefill_sizes)

    def _remember(self, b: int, row: Row, keys: Sequence[bytes]) -> None:
        """Keep the blocks of row b's slots under `keys` (the full blocks of what it holds from slot
        0) that the prefix cache did not get from this row yet. A padded row holds nothing to share."""
        if self.prefix is None or row.plan.pad:
            return
        size = self.prefix.block_size
        for i in range(row.remembered, len(keys)):
            self.prefix.add(keys[i], self.kv.read_slots(b, i * size, size))
        row.remembered = max(row.remembered, len(keys))

    def _remember_pending(self, events: list[Step]) -> None:
        """Up to REMEMBERED_BLOCKS_PER_STEP prompt blocks of the rows whose prompts are in the cache go
        to the prefix cache, oldest request first, a prompt's first blocks first. A block is a copy of
        every layer's slots, so a step pays for a few of them rather than for a whole prompt's: the step
        that completes a long prompt would otherwise lengthen every running row's gap between two
        tokens by the prompt's size. A row that ends first has the rest kept then (`_remember_written`)."""
        if self.prefix is None:
            return
        left = REMEMBERED_BLOCKS_PER_STEP
        running = sorted(  # oldest first (rows differ, so no two tuples get as far as the Row); a padded
            # row holds nothing to share (`_remember`)
            (row.handle.submitted, b, row)
            for b, row in enumerate(self.rows)
            if row is not None and not row.windows and not row.plan.pad
        )
        for _, b, row in running:
            keys = self._keys(row.handle)
            take = min(left, len(keys) - row.remembered)
            if take > 0:
                some = keys[: row.remembered + take]
                self._isolated(functools.partial(self._remember, b, row, some), [b], events)
                left -= take
            if left == 0:
                return

    def _remember_written(self, b: int, row: Row) -> None:
        """At a request's end: its generated tokens' blocks too (a chat's next turn starts with them)."""
        if self.prefix is not None and row.fed // self.prefix.block_size > row.remembered:
            self._remember(b, row, block_keys(row.written, self.prefix.block_size))

    # --- rows -------------------------------------------------------------------------------------

    def _new_row(self, b: int, handle: Handle) -> Row:
        request = handle.request
        cached = self._cached(handle)
        plan = self._prefill_plan(request, cached)
        self.kv.reset_row(b, plan.pad)
        if self.prefix is not None:
            blocks = self.prefix.take(self._keys(handle)[: cached // self.prefix.block_size], len(request.prompt))
            if blocks:
                self.kv.write_slots(b, blocks)
        seed = request.sampling.seed if request.sampling.seed is not None else random.SystemRandom().randrange(2**63)
        seen = None
        if request.sampling.repetition_penalty != 1.0:
            seen = torch.zeros(self.manifest.config.vocab_size, dtype=torch.bool)
            seen[torch.tensor(list(request.prompt))] = True
        text = None if self.text_stream is None else self.text_stream(request.stop_strings)
        generator = torch.Generator().manual_seed(seed)
        blocks = cached // self.prefix.block_size if self.prefix is not None else 0
        matcher = None if request.grammar is None or self.grammars is None else self.grammars.matcher(request.grammar)
        return Row(
            handle,
            plan,
            deque(plan.windows),
            generator,
            seen,
            text=text,
            cached=cached,
            remembered=blocks,
            matcher=matcher,
        )

    def _take_window(self, row: Row, call: Prefill) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The row's next window leaves its plan (the rest of it stays, where the call cuts it);
        its tokens, their positions and their slots, each (call.size,)."""
        first, whole = row.windows.popleft()
        assert first == call.start, "the plan prefills the row's next window"
        if call.size < whole:  # the rest of this window, next time
            row.windows.appendleft((first + call.size, whole - call.size))
        slots = torch.arange(call.start, call.start + call.size)
        tokens = [self.pad_id] * row.plan.pad + list(row.request.prompt)
        ids = torch.tensor(tokens[call.start : call.start + call.size], dtype=torch.long)
        return ids, (slots - row.plan.pad).clamp(min=0), slots  # padding slots at position 0

    def _prompt_done(self, row: Row) -> None:
        """The row's prompt is all in the cache: from the end of this step on, the prefix cache takes
        its blocks, a few a step (`_remember_pending`)."""
        row.fed = len(row.request.prompt)

    def _prefill(self, call: Prefill, events: list[Step]) -> None:
        b, start, size = call.row, call.start, call.size
        row = self.rows[b]
        assert row is not None
        ids, positions, _ = self._take_window(row, call)
        graph = self.backend.graph("prefill", 1, None if self.prefill_sizes is None else size)
        started = time.perf_counter()
        outputs = self.backend.run(graph.name, self.kv.prefill_feeds(graph, b, ids, positions, start))
        self.kv.take(outputs, row=b)
        seconds = time.perf_counter() - started
        self.prefill_cost.observe(size, seconds)
        if self.observer is not None:
            self.observer("prefill", seconds, 1)
        if not row.windows:  # the prompt is in the cache: its last position's logits give the first token
            self._prompt_done(row)
            logits = _finite(outputs["logits"], graph.name)[:1]
            if row.matcher is not None:  # (a row has a matcher only where the loop has grammars)
                self.grammars.constrain([row.matcher], logits)  # type: ignore[union-attr]
            self._advance(b, logits[0], events, self.choose([row], logits)[0])

    def _decode_graph(self, rows: int) -> GraphSpec:
        """The decode graph for the first `rows` rows of the cache: one that takes exactly that many
        (a graph with an open batch does), else the artifact's batch. Rows past the last decoding
        one then cost nothing (row b of every cache buffer is contiguous, so rows 0..k-1 are too)."""
        if rows not in self._decode_graphs:
            found = any(g.serves("decode", rows) for g in self.backend.graphs.values())
            self._decode_graphs[rows] = self.backend.graph("decode", rows) if found else self.decode_graph
        return self._decode_graphs[rows]

    def _decode(self, decoding: list[int], events: list[Step]) -> None:
        graph = self._decode_graph(max(decoding) + 1)
        batch = graph.batch or max(decoding) + 1
        tokens, positions, slots = zip(*map(self._decode_input, self.rows[:batch]), strict=True)
        feeds = self.kv.decode_feeds(graph, torch.tensor(tokens), torch.tensor(positions), torch.tensor(slots))
        running = [self.rows[b] for b in decoding]
        masks = self._start_masks(decoding)
        started = time.perf_counter()
        outputs = self.backend.run(graph.name, feeds)
        self.kv.take(outputs, rows=batch)
        seconds = time.perf_counter() - started
        self._decode_step_s = _average(self._decode_step_s, seconds)
        self._decode_call_s[batch] = _average(self._decode_call_s.get(batch), seconds)
        if self.observer is not None:
            self.observer("decode", seconds, len(decoding))
        logits = _finite(outputs["logits"], graph.name)
        for row in running:
            row.fed += 1  # type: ignore[union-attr]
        every_row = len(decoding) == len(logits)  # (then decoding lists all rows in order)
        if not every_row:
            logits = logits[decoding]  # (a copy, row k is decoding[k])
        self._choose_and_advance(decoding, logits, masks, events)

    def _decode_input(self, row: Row | None) -> tuple[int, int, int]:
        """A row's (token, position, slot) in a call where it brings one token: a decoding row its
        last token; a free row writes slot 0 and a prefilling one where its next call writes anyway,
        both rewritten before they are read."""
        if row is None:
            return self.pad_id, 0, 0
        if row.windows:
            return self.pad_id, 0, row.windows[0][0]
        return row.last_token, row.fed, row.next_slot

    def _start_masks(self, rows: list[int]) -> PendingMasks | None:
        """The constrained rows' masks, filled while the graph runs (None when no row is constrained)."""
        if self.grammars is None:
            return None
        return self.grammars.start_masks([self.rows[b].matcher for b in rows])  # type: ignore[union-attr]

    def _choose_and_advance(
        self, advancing: list[int], logits: torch.Tensor, masks: PendingMasks | None, events: list[Step]
    ) -> None:
        """The next token of each row in `advancing` (logits row k is advancing[k]'s), in one batched
        choice after the grammar masks, then each row's own step, its failure its own."""
        if masks is not None:
            masks.apply(logits)
        chosen = self.choose([self.rows[b] for b in advancing], logits)  # type: ignore[misc]
        for k, (b, token) in enumerate(zip(advancing, chosen, strict=True)):
            self._isolated(functools.partial(self._advance, b, logits[k], events, token), [b], events)

    def _packed_step(self, plan: Plan, events: list[Step]) -> None:
        """The step as one call of the packed graph: each decoding row's token and each prefilling
        row's slice (its first call in the plan; a row's later windows wait for the next step)."""
        decoding = [b for b in plan.decode if (row := self.rows[b]) is not None and not row.windows]
        slices: dict[int, Prefill] = {}
        for call in plan.prefill:
            slices.setdefault(call.row, call)
        involved = sorted({*decoding, *slices})
        self._isolated(lambda: self._packed_call(decoding, slices, events), involved, events)

    def _packed_call(self, decoding: list[int], slices: dict[int, Prefill], events: list[Step]) -> None:
        assert self.packed_graph is not None
        taken: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for b, call in slices.items():  # a request whose own part fails ends alone, before the call

            def take(b: int = b, call: Prefill = call) -> None:
                taken[b] = self._take_window(self.rows[b], call)  # type: ignore[arg-type]

            self._isolated(take, [b], events)
        slices = {b: call for b, call in slices.items() if b in taken}
        if not decoding and not slices:
            return
        graph, count = self.packed_graph, max([*decoding, *slices]) + 1
        tokens, positions, slots = [], [], []
        for b, row in enumerate(self.rows[:count]):
            if b in taken:
                ids, at, where = taken[b]
            else:  # one token: a decoding row's, or an idle row's harmless write
                ids, at, where = (torch.tensor([value]) for value in self._decode_input(row))
            tokens.append(ids)
            positions.append(at)
            slots.append(where)
        done = [b for b in slices if slices[b].last]  # their prompts complete in this call
        advancing = sorted([*decoding, *done])
        masks = self._start_masks(advancing)
        started = time.perf_counter()
        outputs = self.backend.run(graph.name, self.kv.packed_feeds(graph, tokens, positions, slots))
        self.kv.take(outputs, rows=count)
        seconds = time.perf_counter() - started
        prompt_tokens = sum(len(taken[b][0]) for b in slices)
        # what the prompt tokens added: beyond a decode call of as many rows (each slice's first token
        # stands for that row's one), observed once such a call has run. Against the average decode
        # step, a call with a row still prefilling was measured against calls with that row decoding
        # too: its tokens read cheap, and the budget let the step run longer than its share
        base = self._decode_call_s.get(count)
        if decoding and base is not None and prompt_tokens > len(slices):
            self.added_cost.observe(prompt_tokens - len(slices), seconds - base)
        elif not decoding:
            self.prefill_cost.observe(prompt_tokens, seconds)
        if self.observer is not None:
            self.observer("mixed" if decoding else "prefill", seconds, len(advancing))
        logits = _finite(outputs["logits"], graph.name)[advancing]  # (a copy, row k is advancing[k])
        for b in decoding:
            self.rows[b].fed += 1  # type: ignore[union-attr]
        for b in done:
            self._prompt_done(self.rows[b])  # type: ignore[arg-type]
        if advancing:
            self._choose_and_advance(advancing, logits, masks, events)

    def _advance(self, b: int, logits: torch.Tensor, events: list[Step], token: int) -> None:
        """Row b's next token (chosen from `logits` (vocab,)): emit it, end the request or keep
        decoding."""
        row = self.rows[b]
        assert row is not None
        request, handle = row.request, row.handle
        elapsed = time.perf_counter() - handle.submitted
        logits = logits[None]  # (1, vocab)
        logprob = float(token_logprobs(logits, torch.tensor([token]))[0]) if request.logprobs else None
        top = top_logprobs(logits[0], request.top_logprobs) if request.top_logprobs else ()
        stop_ids = request.stop_ids | (self.eos_ids if request.use_eos else frozenset())
        if row.matcher is not None and token not in stop_ids and not row.matcher.consume_token(token):
            raise InputError(f"token {token} is not allowed by the request's grammar ({row.matcher.get_error()[:160]})")
        if token in stop_ids:
            self._remember_written(b, row)
            self.rows[b] = None
            return self._finish(handle, token, "stop", events, elapsed, _rest(row), cached=row.cached)
        row.generated.append(token)
        if row.seen is not None:
            row.seen[token] = True
        text, stop = row.text.push(token) if row.text is not None else ("", None)
        room = self.manifest.max_cache_len - row.next_slot  # slots left to write the next tokens into
        reason = "stop" if stop else ("length" if len(row.generated) >= request.max_new_tokens or room < 1 else None)
        if reason == "length":
            text += _rest(row)
        kept = row.text.kept if stop and row.text is not None else None
        step = Step(
            handle.index, token, logprob, reason, elapsed, stop, top, text=text, kept=kept, cached_tokens=row.cached
        )
        self._emit(handle, step, events)
        if reason is not None:
            self._remember_written(b, row)
            self.rows[b] = None
        else:
            row.last_token = token

    def _emit(self, handle: Handle, step: Step, events: list[Step]) -> None:
        handle.emit(step)
        events.append(step)

    def _finish(
        self,
        handle: Handle,
        stop_id: int | None,
        reason: str,
        events: list[Step],
        elapsed: float | None = None,
        text: str = "",
        error: str | None = None,
        cached: int = 0,
    ) -> None:
        elapsed = time.perf_counter() - handle.submitted if elapsed is None else elapsed
        step = Step(handle.index, None, None, reason, elapsed, stop_id, text=text, error=error, cached_tokens=cached)
        self._emit(handle, step, events)


class _Driving:
    """Held while a thread drives the loop: a second driver (say `generate` on a served LLM) is
    refused with one line instead of racing the first over the rows and the cache."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):
            raise InputError(
                "this loop is already running in another thread (a server, or another generate); submit "
                "requests to it instead of driving it twice"
            )

    def __exit__(self, *_: object) -> None:
        self.lock.release()


def _rest(row: Row) -> str:
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
    # a NaN or inf anywhere makes a row's sum one (so do logits of ~1e34); one sum of all rows first,
    # since every step pays for this check
    sums = logits.sum(-1) if not math.isfinite(float(logits.sum())) else None
    if sums is not None and not torch.isfinite(sums).all():
        rows = [int(r) for r in (~torch.isfinite(sums)).nonzero()[:, 0]]
        raise NumericalError(
            f"the {graph} graph produced NaN/inf logits (rows {rows}); the artifact is damaged: run `llamatrt "
            "verify` on it, or re-export"
        )
    return logits
