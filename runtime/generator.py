"""Generator: prompts in, steps out, in the caller's thread, over the one loop (runtime.scheduler).

More prompts than the artifact's batch are queued and admitted as rows free up; each prompt's
tokens equal what it gets alone. The scheduler (and its cache) lives as long as the Generator, so
a call allocates nothing that scales with the cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from llamatrt.base.errors import InputError
from llamatrt.runtime.backend import Backend
from llamatrt.runtime.detokenizer import TextStreamFactory
from llamatrt.runtime.requests import GREEDY, Fit, Request, Step
from llamatrt.runtime.sampling import SamplingParams
from llamatrt.runtime.scheduler import Scheduler
from llamatrt.runtime.structured import Grammar

__all__ = ["GREEDY", "Generator", "Step"]


class Generator:
    def __init__(
        self,
        backend: Backend,
        stop_ids: Iterable[int] = (),
        pad_id: int = 0,
        text: TextStreamFactory | None = None,
        **policies: Any,
    ) -> None:
        """`policies` go to the Scheduler: admission, choose, observer (what the tools pass in)."""
        self.backend = backend
        self.manifest = backend.manifest
        self.scheduler = Scheduler(backend, stop_ids, pad_id, text, **policies)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, **kwargs: Any) -> list[list[int]]:
        """Token ids per prompt (stop ids excluded); drains `stream`."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, max_new_tokens, **kwargs):
            if step.token_id is not None:
                out[step.index].append(step.token_id)
        return out

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        sampling: SamplingParams = GREEDY,
        stop_strings: Sequence[str] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        stop_ids: Iterable[int] = (),
        fit: Fit = Request.fit,
        use_eos: bool = True,
        grammar: Grammar | None = None,
    ) -> Iterator[Step]:
        """Steps of all prompts as they come (`index` says whose). `fit="cap"` ends a prompt whose
        budget does not fit the cache with finish_reason "length" when the cache is full; "refuse"
        raises InputError before anything runs."""
        stops, strings = frozenset(stop_ids), tuple(stop_strings)
        requests = [
            Request(
                list(p),
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                stop_ids=stops,
                stop_strings=strings,
                use_eos=use_eos,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                fit=fit,
                grammar=grammar,
            )
            for p in prompts
        ]
        yield from self.run(requests)

    def run(self, requests: Sequence[Request]) -> Iterator[Step]:
        """Every request's steps; all are checked before any runs, and a caller that stops reading
        frees their rows."""
        if not requests:
            raise InputError("no prompts given; pass at least one prompt")
        checked = [self.scheduler.check(r, i) for i, r in enumerate(requests)]
        handles = [self.scheduler.submit(r, i) for i, r in enumerate(checked)]
        try:
            yield from self.scheduler.run(handles)
        finally:
            for handle in handles:
                handle.cancel()
            if any(not h.done.is_set() for h in handles):
                for _ in self.scheduler.run(handles):
                    pass
