"""Sampling as pure functions of logits, with one seeded torch.Generator per prompt (no global seed).

Order as transformers applies them: repetition penalty, temperature, top-k, top-p, min-p.
A prompt's generator is seeded with `seed` alone, so a prompt samples the same tokens alone or in
a batch, and on every backend whose logits agree.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from llamatrt.errors import InputError

# Temperatures below this are greedy (vLLM's threshold): dividing logits by less would overflow them.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a fresh random seed per call

    def checked(self) -> SamplingParams:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"{name.replace('_', ' ')} {getattr(self, name)} is not a finite number; pass one")
        if not self.temperature >= 0:
            raise InputError(
                f"temperature {self.temperature} must be >= 0; pass 0 for greedy or a positive temperature"
            )
        if self.top_k < 0:
            raise InputError(f"top-k {self.top_k} must be >= 0; pass 0 to turn it off")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top-p {self.top_p} must be in (0, 1]; pass e.g. 0.9, or 1 to turn it off")
        if not 0 <= self.min_p < 1:
            raise InputError(f"min-p {self.min_p} must be in [0, 1); pass e.g. 0.05, or 0 to turn it off")
        if not self.repetition_penalty > 0:
            raise InputError(
                f"repetition penalty {self.repetition_penalty} must be > 0; pass e.g. 1.1, or 1 to turn it off"
            )
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InputError(f"seed {self.seed} must be in [0, 2**64); pick a smaller one")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def generators_for(params: SamplingParams, rows: int) -> list[torch.Generator]:
    seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
    return [torch.Generator().manual_seed(seed) for _ in range(rows)]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: seen tokens' positive logits divided by `penalty`, negative ones multiplied. An
    extreme penalty overflows to infinities: they are clamped to the largest finite logit, so what
    follows never sees inf - inf (a NaN)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    big = torch.finfo(logits.dtype).max
    return torch.where(seen, penalized, logits).clamp(min=-big, max=big)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p as -inf masks (batch, vocab) -> (batch, vocab)."""
    big = torch.finfo(logits.dtype).max
    logits = (logits / params.temperature).clamp(min=-big, max=big)  # a tiny temperature overflows otherwise
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the token crossing p
        drop_sorted[..., 0] = False  # and always the most likely one (a top_p below fp32's range rounds to 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator], seen: torch.Tensor | None
) -> torch.Tensor:
    """(batch, vocab) fp32 logits -> (batch,) token ids."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each chosen token under the model's raw distribution."""
    return logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]


def top_logprobs(logits: torch.Tensor, count: int) -> tuple[tuple[int, float], ...]:
    """The `count` most likely tokens of (vocab,) raw logits, with their log-probabilities."""
    values, ids = logits.log_softmax(-1).topk(count)
    return tuple(zip(ids.tolist(), values.tolist(), strict=True))
