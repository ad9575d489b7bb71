"""Generator: the only prefill/decode loop. It knows a Backend's `run` and nothing else of it.

Prompts are left-padded to a common width (at least one prefill chunk) and prefilled in windows of
the chunk size; the last window ends at the last prompt token, overlapping the one before it when
the width is not a multiple of the chunk (rewriting a slot with the same token and context gives
the same keys/values), so the logits of every row's last token are the graph's last position.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from llamatrt.errors import InputError, NumericalError
from llamatrt.runtime.backend import Backend, torch_threads
from llamatrt.runtime.kv_state import KVState
from llamatrt.runtime.sampling import SamplingParams, generators_for, next_tokens, token_logprobs
from llamatrt.runtime.stopping import Detokenize, StopCriteria

GREEDY = SamplingParams()


@dataclass(frozen=True)
class Step:
    """One event of one prompt: a new token, and/or the end of that prompt."""

    index: int  # the prompt's position in the call
    token_id: int | None  # None on a final step ended by a stop id (stop ids are not emitted)
    logprob: float | None
    finish_reason: str | None  # None while running, then "stop" or "length"
    elapsed_s: float  # since its batch started (first step of a prompt = time to first token)


def prefill_windows(width: int, chunk: int) -> list[int]:
    """Start slots of the prefill calls covering [0, width), each `chunk` long, the last ending at width."""
    starts = list(range(0, width - chunk + 1, chunk))
    if starts[-1] + chunk < width:
        starts.append(width - chunk)
    return starts


class Generator:
    def __init__(
        self, backend: Backend, stop_ids: Iterable[int] = (), pad_id: int = 0, detokenize: Detokenize | None = None
    ) -> None:
        self.backend = backend
        self.manifest = backend.manifest
        self.stop_ids = frozenset(stop_ids)
        self.pad_id = pad_id
        self.detokenize = detokenize

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
    ) -> Iterator[Step]:
        """Steps of all prompts; more prompts than the artifact's batch run in successive batches."""
        self._check(prompts, max_new_tokens, sampling.checked(), stop_strings)
        criteria = StopCriteria(self.stop_ids, tuple(stop_strings), self.detokenize)
        generators = generators_for(sampling, len(prompts))
        kv = KVState(self.backend)  # cache buffers allocated once for the whole call
        batch = self.manifest.batch_size
        with torch_threads(self.backend.loop_threads):
            for first in range(0, len(prompts), batch):
                rows = [list(p) for p in prompts[first : first + batch]]
                yield from self._stream_batch(kv, rows, first, max_new_tokens, sampling, criteria,
                                              generators[first : first + batch], logprobs)  # fmt: skip

    def _check(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams,
        stop_strings: Sequence[str] = (),
    ) -> None:  # fmt: skip
        if any(not s for s in stop_strings):
            raise InputError("a stop string is empty (it would stop every row at once); give non-empty --stop strings")
        if not prompts:
            raise InputError("no prompts given; pass at least one prompt")
        if max_new_tokens < 1:
            raise InputError(f"max new tokens {max_new_tokens} must be >= 1; ask for at least one token")
        vocab, capacity = self.manifest.config.vocab_size, self.manifest.max_cache_len
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise InputError(f"prompt {i} is empty; give it at least one token")
            if len(prompt) > capacity:
                raise InputError(f"prompt {i} has {len(prompt)} tokens, the cache holds {capacity}; shorten it or "
                                 "re-export with a larger --max-seq-len")  # fmt: skip
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise InputError(f"prompt {i} has a token id outside the vocabulary [0, {vocab}); encode it with "
                                 "this artifact's tokenizer")  # fmt: skip

    def score(self, prompts: Sequence[Sequence[int]], forced: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Teacher-forced logits per prompt, (len(forced), vocab): row k predicts forced[k] (after the
        prompt, then after each forced token but the last). The same prefill/decode as generation."""
        self._check(prompts, 1, GREEDY)
        if len(forced) != len(prompts) or len({len(f) for f in forced}) != 1:
            raise InputError("score() needs one forced-token list per prompt, all of the same length")
        steps = len(forced[0])
        width = max(*map(len, prompts), self.manifest.prefill_chunk)  # prompts are padded to a full chunk
        if width + steps - 1 > self.manifest.max_cache_len:
            raise InputError(f"prompt ({width} slots with padding) plus {steps} forced tokens exceed the cache of "
                             f"{self.manifest.max_cache_len}; use fewer steps or re-export with a larger --max-seq-len")  # fmt: skip
        kv, batch, out = KVState(self.backend), self.manifest.batch_size, []
        with torch_threads(self.backend.loop_threads):
            for first in range(0, len(prompts), batch):
                rows = [list(p) for p in prompts[first : first + batch]]
                tokens = torch.full((batch, steps), self.pad_id, dtype=torch.long)
                for b, row in enumerate(forced[first : first + batch]):
                    tokens[b] = torch.tensor(row, dtype=torch.long)
                logits, next_position = self._start_batch(kv, rows)
                collected = [logits.clone()]
                for step in range(steps - 1):
                    collected.append(self._decode(kv, tokens[:, step], next_position).clone())
                    next_position += 1
                stacked = torch.stack(collected, dim=1)  # (batch, steps, vocab)
                out += [stacked[b] for b in range(len(rows))]
        return out

    def _start_batch(self, kv: KVState, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad `rows` (plus filler rows up to the batch size) and prefill them.
        Returns the next-token logits (batch, vocab) and each row's next RoPE position."""
        batch = self.manifest.batch_size
        lengths = [len(r) for r in rows] + [1] * (batch - len(rows))  # filler rows hold one pad token
        width = max(*lengths, self.manifest.prefill_chunk)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, width - len(row) :] = torch.tensor(row)
            positions[b, width - len(row) :] = torch.arange(len(row))
        kv.start([width - n for n in lengths])
        return self._prefill(kv, ids, positions), torch.tensor(lengths)

    def _stream_batch(
        self, kv: KVState, rows: list[list[int]], first: int, max_new_tokens: int, sampling: SamplingParams,
        criteria: StopCriteria, generators: list[torch.Generator], logprobs: bool,
    ) -> Iterator[Step]:  # fmt: skip
        started = time.perf_counter()
        batch, real = self.manifest.batch_size, len(rows)
        generators = generators + [torch.Generator() for _ in range(batch - real)]
        seen = self._seen_tokens(rows, batch, sampling)
        logits, next_position = self._start_batch(kv, rows)
        active = [b < real for b in range(batch)]
        generated: list[list[int]] = [[] for _ in range(batch)]
        while True:
            tokens = next_tokens(logits, sampling, generators, seen)
            chosen = token_logprobs(logits, tokens).tolist() if logprobs else [None] * batch
            elapsed = time.perf_counter() - started
            for b in range(real):
                if active[b]:
                    token, reason = self._advance_row(int(tokens[b]), generated[b], max_new_tokens, kv, criteria)
                    active[b] = reason is None
                    yield Step(first + b, token, chosen[b] if token is not None else None, reason, elapsed)
            if not any(active):
                return
            if seen is not None:
                seen[torch.arange(batch), tokens] = True
            tokens = torch.where(torch.tensor(active), tokens, self.pad_id)
            logits = self._decode(kv, tokens, next_position)
            next_position += 1

    def _advance_row(
        self, token: int, generated: list[int], max_new_tokens: int, kv: KVState, criteria: StopCriteria
    ) -> tuple[int | None, str | None]:
        """(token to emit or None, finish reason or None) for one row's newly sampled token."""
        if token in criteria.stop_ids:
            return None, "stop"
        generated.append(token)
        if criteria.stop_string_in(generated) is not None:
            return token, "stop"
        if len(generated) >= max_new_tokens or kv.free_slots == 0:  # no slot left to decode this token
            return token, "length"
        return token, None

    def _seen_tokens(self, rows: list[list[int]], batch: int, sampling: SamplingParams) -> torch.Tensor | None:
        if sampling.repetition_penalty == 1.0:
            return None
        seen = torch.zeros(batch, self.manifest.config.vocab_size, dtype=torch.bool)
        for b, row in enumerate(rows):
            seen[b, torch.tensor(row)] = True
        return seen

    def _prefill(self, kv: KVState, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        graph = self.backend.graph("prefill")
        chunk = graph.seq_len
        for start in prefill_windows(ids.shape[1], chunk):
            window = slice(start, start + chunk)
            outputs = self.backend.run(graph.name, kv.feeds(graph, ids[:, window], positions[:, window], start))
            kv.update(outputs, next_slot=start + chunk)
        return _finite(outputs["logits"], graph.name)

    def _decode(self, kv: KVState, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        graph, slot = self.backend.graph("decode"), kv.next_slot
        outputs = self.backend.run(graph.name, kv.feeds(graph, tokens[:, None], positions[:, None], slot))
        kv.update(outputs, next_slot=slot + 1)
        return _finite(outputs["logits"], graph.name)


def _finite(logits: torch.Tensor, graph: str) -> torch.Tensor:
    """The logits on the CPU in fp32, or a one-line error: a NaN is a broken artifact, never a token."""
    logits = logits.float().cpu()
    if not torch.isfinite(logits).all():
        rows = sorted({int(r) for r in (~torch.isfinite(logits)).nonzero()[:, 0]})
        raise NumericalError(f"the {graph} graph produced NaN/inf logits (rows {rows}); the artifact is damaged: "
                             "run `llamatrt verify` on it, or re-export")  # fmt: skip
    return logits
