"""The server's engine: one artifact, one scheduler looping in its own thread, requests from asyncio.

HTTP handlers submit requests from the event loop; the scheduler thread runs them in flight and
hands each step back to the loop (`call_soon_threadsafe`). A handler that goes away (the client
disconnected) cancels its request, which frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamatrt.base.errors import InputError, LlamatrtError
from llamatrt.runtime.llm import LLM, TextDelta, TextTracker, load
from llamatrt.runtime.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from llamatrt.runtime.requests import Handle, Request, Step
from llamatrt.runtime.sampling_params import sampling_params
from llamatrt.runtime.scheduler import LoopFailed
from llamatrt.runtime.structured import Grammar
from llamatrt.server.metrics import Metrics
from llamatrt.server.protocol import BadRequest
from llamatrt.server.tools import Tools


class QueueFull(InputError):
    """A 429: more requests waiting than --max-queue."""


class GenerationFailed(LlamatrtError):
    """A 500 (or an error event on a stream): this request failed; the server goes on."""


class Unavailable(LlamatrtError):
    """A 503: the generation loop stopped; /health says so too."""


@dataclass(frozen=True)
class Submitted:
    """A request in the loop: its handle, the steps the loop hands to the event loop, its text."""

    handle: Handle
    steps: asyncio.Queue[Step]
    tracker: TextTracker


@dataclass(frozen=True)
class EngineConfig:
    artifact: Path
    backend: str = "onnxruntime"
    model_name: str | None = None  # default: the artifact folder's name
    max_queue: int = 64
    verify: bool = True
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB


class Engine:
    def __init__(self, config: EngineConfig, metrics: Metrics) -> None:
        self.config, self.metrics = config, metrics
        self.llm: LLM = load(
            config.artifact, config.backend, verify=config.verify, prefix_cache_mb=config.prefix_cache_mb
        )
        self.scheduler = self.llm.scheduler
        self.model_name = config.model_name or Path(config.artifact).resolve().name
        self.fingerprint = f"fp_llamatrt_{os.getpid()}"  # tells replicas apart
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self.scheduler.serve_forever, args=(self._stop,), daemon=True, name="llamatrt-scheduler"
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self.scheduler.wake_up()
        self._thread.join(timeout=10)
        self.llm.close()

    @property
    def healthy(self) -> str | None:
        """None while the loop runs, else why it does not."""
        if self.scheduler.failed is not None:
            return self.scheduler.failed
        return None if self._thread.is_alive() else "the generation loop is not running"

    def encode(self, prompt: str | list[int] | None, messages: list[dict[str, str]] | None) -> list[int]:
        if messages is not None:
            return self.llm.encode_chat(messages)
        assert prompt is not None
        return self.llm.encode(prompt)

    def request(
        self,
        ids: list[int],
        max_tokens: int | None,
        sampling: dict[str, object],
        stop: tuple[str, ...],
        logprobs: bool,
        top_logprobs: int,
        grammar: Grammar | None = None,
    ) -> Request:
        """The scheduler request (checked: a 400 if it cannot run). Without max_tokens, a request
        gets what is left of its row's cache."""
        capped = max_tokens is None
        request = Request(
            ids,
            max_new_tokens=max_tokens or self.llm.manifest.max_cache_len,
            sampling=sampling_params(sampling),
            stop_strings=stop,
            logprobs=logprobs or bool(top_logprobs),
            top_logprobs=top_logprobs,
            fit="cap" if capped else "refuse",
            grammar=grammar,
        )
        return self.scheduler.check(request)

    def grammar(self, response_format: dict[str, Any] | None, tools: Tools | None = None) -> Grammar | None:
        """The compiled grammar of a request's response_format, or of the call form when it must call a
        tool (a 400 naming what the engine cannot enforce exactly)."""
        if tools is not None and tools.forced:
            try:
                return self.llm.grammar(json_schema=tools.call_schema())
            except InputError as e:
                raise BadRequest(f"tools: {e}", "tools") from e
        if response_format is None:
            return None
        try:
            if response_format["type"] == "json_object":
                return self.llm.grammar(json_object=True)
            return self.llm.grammar(json_schema=response_format["schema"])
        except InputError as e:
            raise BadRequest(f"response_format: {e}", "response_format") from e

    def submit(self, requests: list[Request]) -> list[Submitted]:
        """Queue all of `requests` or none (one request's prompts): a 429 if more than --max-queue
        would then wait for a row (requests that start at once in free rows do not count), a 503 if
        the loop has stopped. Synchronous, so no other handler admits in between."""
        waiting = self.scheduler.waiting
        if waiting + len(requests) - self.scheduler.free_rows > self.config.max_queue:
            raise QueueFull(f"{waiting} requests are waiting (--max-queue {self.config.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        submitted: list[Submitted] = []
        try:
            for index, request in enumerate(requests):
                steps: asyncio.Queue[Step] = asyncio.Queue()
                handle = self.scheduler.submit(
                    request, index, on_step=lambda step, q=steps: loop.call_soon_threadsafe(q.put_nowait, step)
                )
                tracker = TextTracker(index, len(request.prompt), self.llm.tokenizer is not None)
                submitted.append(Submitted(handle, steps, tracker))
        except LoopFailed as e:
            for done in submitted:
                done.handle.cancel()
            raise Unavailable(str(e)) from e
        self.metrics.observe_queue(self.scheduler)
        return submitted

    async def deltas(self, run: Submitted) -> AsyncGenerator[tuple[TextDelta, TextTracker], None]:
        """A submitted request's text deltas (with the tracker that holds its result); leaving early
        (the client went away) cancels it, which frees its row at the next step."""
        last = time.perf_counter()
        try:
            while True:
                step = await run.steps.get()
                now = time.perf_counter()
                self.metrics.token_time(step, now - last, first=run.tracker.first_s is None)
                last = now
                if step.finish_reason == "error":
                    raise GenerationFailed(step.error or "generation failed")
                delta = run.tracker.apply(step)
                if delta is not None:
                    yield delta, run.tracker
                if step.finish_reason is not None:
                    return
        finally:
            if not run.handle.done.is_set():
                run.handle.cancel()
            self.metrics.observe_queue(self.scheduler)
