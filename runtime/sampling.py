"""Sampling as pure functions of logits, with one seeded torch.Generator per prompt (no global seed).

Order as transformers applies them: repetition penalty, temperature, top-k, top-p, min-p. Every
row of a step is sampled in one call with its own parameters (the loop's rows are different
requests). A prompt's generator is seeded with `seed` alone, so a prompt samples the same tokens
alone or in a batch, and on every backend whose logits agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llamatrt.runtime.sampling_params import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL-style: seen tokens' positive logits divided by `penalty` (one per row, (rows, 1), or one
    for all), negative ones multiplied. An extreme penalty overflows to infinities: they are clamped
    to the largest finite logit, so what follows never sees inf - inf (a NaN)."""
    if isinstance(penalty, float) and penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    big = torch.finfo(logits.dtype).max
    return torch.where(seen, penalized, logits).clamp(min=-big, max=big)


def _column(params: Sequence[SamplingParams], name: str, off: float = 0.0) -> torch.Tensor:
    """One parameter of every row as a (rows, 1) column; `off` replaces a 0 ("turned off")."""
    return torch.tensor([[float(getattr(p, name)) or off] for p in params])


def filter_sorted(logits: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, then top-k / top-p / min-p, each row with its own parameters, on the logits
    sorted once in descending order: (sorted logits with dropped ones at -inf, the order), both
    (rows, vocab). The most likely token is never dropped."""
    big = torch.finfo(logits.dtype).max
    scaled = (logits / _column(params, "temperature", 1.0)).clamp(min=-big, max=big)  # a tiny temperature overflows
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1])
    drop = rank >= _column(params, "top_k", float(logits.shape[-1]))
    probs = ordered.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= probs.cumsum(-1) - probs >= _column(params, "top_p")  # keep the token crossing p
    drop[:, 0] = False  # (a top_p below fp32's range rounds to 0)
    probs = ordered.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= probs < _column(params, "min_p") * probs[:, :1]
    drop[:, 0] = False
    return ordered.masked_fill(drop, float("-inf")), order


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """(rows, vocab) fp32 logits -> (rows,) token ids, every row with its own parameters, in one
    batched call. A sampled row draws one uniform number from its own generator (so its tokens do not
    depend on the other rows) and takes the token where the cumulative probability passes it."""
    if seen is not None:
        penalty = _column(params, "repetition_penalty", 1.0)
        if bool((penalty != 1).any()):
            logits = apply_repetition_penalty(logits, seen, penalty)
    tokens = greedy_tokens(logits)
    sampled = [r for r, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    ordered, order = filter_sorted(logits[sampled], [params[r] for r in sampled])
    cumulative = ordered.softmax(-1).cumsum(-1)
    draws = torch.cat([torch.rand(1, generator=generators[r]) for r in sampled])[:, None] * cumulative[:, -1:]
    last_kept = torch.isfinite(ordered).sum(-1, keepdim=True) - 1
    picked = torch.searchsorted(cumulative, draws, right=True).clamp(max=last_kept)
    tokens[sampled] = order.gather(-1, picked)[:, 0]
    return tokens


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """(rows, vocab) CPU logits -> (rows,) ids of the first largest logit, as torch.argmax. numpy's
    argmax is vectorized where torch's single-threaded one is not, and this runs once a step."""
    return torch.from_numpy(logits.numpy().argmax(-1))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each chosen token under the model's raw distribution."""
    return logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]


def top_logprobs(logits: torch.Tensor, count: int) -> tuple[tuple[int, float], ...]:
    """The `count` most likely tokens of (vocab,) raw logits, with their log-probabilities."""
    values, ids = logits.log_softmax(-1).topk(count)
    return tuple(zip(ids.tolist(), values.tolist(), strict=True))
