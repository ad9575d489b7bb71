"""Sampling filters as pure functions."""

from __future__ import annotations

import torch

from llamatrt.runtime.sampling import SamplingParams, apply_repetition_penalty, filter_logits, next_tokens

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def kept(params: SamplingParams) -> list[int]:
    return torch.isfinite(filter_logits(LOGITS, params))[0].nonzero().flatten().tolist()


def test_top_k_top_p_min_p() -> None:
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [0, 1]
    assert kept(SamplingParams(temperature=1.0, top_p=0.5)) == [0]
    assert kept(SamplingParams(temperature=1.0, top_p=0.7)) == [0, 1]
    assert kept(SamplingParams(temperature=1.0, top_p=0.76)) == [0, 1, 2]
    assert kept(SamplingParams(temperature=1.0, min_p=0.35)) == [0, 1]


def test_temperature_sharpens() -> None:
    cold = filter_logits(LOGITS, SamplingParams(temperature=0.5)).softmax(-1)
    assert cold[0, 0] > 0.5


def test_repetition_penalty_and_greedy() -> None:
    logits = torch.tensor([[2.0, 1.5, -1.0]])
    seen = torch.tensor([[True, False, True]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, 1.5, -2.0]]
    params = SamplingParams(repetition_penalty=2.0)
    assert next_tokens(logits, params, [torch.Generator()], seen).tolist() == [1]
    assert next_tokens(logits, SamplingParams(), [torch.Generator()], None).tolist() == [0]
