"""Sampling from valid parameters never produces NaN, at their extremes (a server's request is one
NaN away from ending, so this is what keeps one request from harming the loop)."""

from __future__ import annotations

import itertools

import pytest
import torch

from llamatrt.base.errors import InputError
from llamatrt.runtime.sampling import SamplingParams, sample

EXTREMES = {
    "temperature": [0.0, 1e-300, 1e-6, 1e-5, 2.0, 1e6],
    "repetition_penalty": [1e-300, 1e-6, 1.0, 1e6, 1e300],
    "top_p": [1e-300, 0.5, 1.0],
    "top_k": [0, 1, 5],
    "min_p": [0.0, 0.999],
}


def _logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 64, generator=g) * 30
    logits[0, :8] = torch.finfo(torch.float32).max / 2  # near-overflow logits
    logits[1, 3] = -torch.finfo(torch.float32).max
    return logits


@pytest.mark.parametrize("temperature", EXTREMES["temperature"])
def test_no_extreme_valid_setting_samples_outside_the_vocabulary(temperature: float) -> None:
    logits, seen = _logits(), torch.zeros(3, 64, dtype=torch.bool)
    seen[:, ::2] = True
    for penalty, top_p, top_k, min_p in itertools.product(*(EXTREMES[k] for k in list(EXTREMES)[1:])):
        params = SamplingParams(temperature, top_k, top_p, min_p, penalty, seed=1).checked()
        tokens = sample(logits.clone(), [params] * 3, [torch.Generator().manual_seed(1) for _ in range(3)], seen)
        assert tokens.shape == (3,) and bool(((tokens >= 0) & (tokens < 64)).all()), params


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parameters_are_refused(name: str, value: float) -> None:
    with pytest.raises(InputError, match="finite"):
        SamplingParams(**{name: value}).checked()


def test_temperatures_below_the_threshold_are_greedy() -> None:
    logits = _logits()
    greedy = sample(logits, [SamplingParams()] * 3, [torch.Generator() for _ in range(3)], None)
    tiny = sample(logits, [SamplingParams(temperature=1e-300)] * 3, [torch.Generator() for _ in range(3)], None)
    assert torch.equal(greedy, tiny)
