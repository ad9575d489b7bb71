"""Generator: prompts in, steps out, in the caller's thread, over the one loop (runtime.scheduler).

More prompts than the artifact's batch are queued and admitted as rows free up; each prompt's
tokens equal what it gets alone. The scheduler (and its cache) lives as long as the Generator, so
a call allocates nothing that scales with the cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from llamatrt.base.errors import InputError
from llamatrt.runtime.backend import Backend
from llamatrt.runtime.detokenizer import TextStreamFactory
from llamatrt.runtime.sampling import SamplingParams
from llamatrt.runtime.scheduler import GREEDY, Request, Scheduler, Step

__all__ = ["GREEDY", "Generator", "Step"]


class Generator:
    def __init__(
        self, backend: Backend, stop_ids: Iterable[int] = (), pad_id: int = 0, text: TextStreamFactory | None = None,
        admission: str = "continuous",
    ) -> None:  # fmt: skip
        self.backend = backend
        self.manifest = backend.manifest
        self.scheduler = Scheduler(backend, stop_ids, pad_id, text, admission)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, **kwargs) -> list[list[int]]:
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
        fit: str = "cap",
    ) -> Iterator[Step]:
        """Steps of all prompts as they come (`index` says whose). `fit="cap"` ends a prompt whose
        budget does not fit the cache with finish_reason "length" when the cache is full; "refuse"
        raises InputError before anything runs."""
        stops, strings = frozenset(stop_ids), tuple(stop_strings)
        requests = [
            Request(
                list(p), max_new_tokens, sampling, stops, strings, logprobs=logprobs, top_logprobs=top_logprobs, fit=fit
            )
            for p in prompts
        ]
        yield from self._run(requests)

    def score(self, prompts: Sequence[Sequence[int]], forced: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Teacher-forced logits per prompt, (len(forced), vocab): row k predicts forced[k] (after the
        prompt, then after each forced token but the last). The same prefill/decode as generation."""
        if len(forced) != len(prompts) or len({len(f) for f in forced}) != 1:
            raise InputError("score() needs one forced-token list per prompt, all of the same length")
        logits: list[list[torch.Tensor]] = [[] for _ in prompts]
        for step in self._run(
            [Request(list(p), forced=list(f), use_eos=False) for p, f in zip(prompts, forced, strict=True)]
        ):
            if step.logits is not None:
                logits[step.index].append(step.logits)
        return [torch.stack(rows) for rows in logits]

    def _run(self, requests: list[Request]) -> Iterator[Step]:
        if not requests:
            raise InputError("no prompts given; pass at least one prompt")
        checked = [self.scheduler.check(r, i) for i, r in enumerate(requests)]  # all refused before any runs
        handles = [self.scheduler.submit(r, i) for i, r in enumerate(checked)]
        try:
            yield from self.scheduler.run(handles)
        finally:  # a caller that stops reading frees its rows
            for handle in handles:
                handle.cancel()
            if any(not h.done.is_set() for h in handles):
                for _ in self.scheduler.run(handles):
                    pass
