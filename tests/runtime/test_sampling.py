"""Sampling as pure functions: filters, penalties and the batched draw with a parameter set per row."""

from __future__ import annotations

import torch

from llamatrt.runtime.sampling import SamplingParams, apply_repetition_penalty, filter_sorted, sample

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def kept(params: SamplingParams) -> list[int]:
    ordered, order = filter_sorted(LOGITS, [params])
    return sorted(order[0][torch.isfinite(ordered[0])].tolist())


def test_top_k_top_p_min_p() -> None:
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [0, 1]
    assert kept(SamplingParams(temperature=1.0, top_p=0.5)) == [0]
    assert kept(SamplingParams(temperature=1.0, top_p=0.7)) == [0, 1]
    assert kept(SamplingParams(temperature=1.0, top_p=0.76)) == [0, 1, 2]
    assert kept(SamplingParams(temperature=1.0, min_p=0.35)) == [0, 1]
    assert kept(SamplingParams(temperature=1.0)) == [0, 1, 2, 3]


def test_temperature_sharpens() -> None:
    ordered, _ = filter_sorted(LOGITS, [SamplingParams(temperature=0.5)])
    assert ordered.softmax(-1)[0, 0] > 0.5


def test_repetition_penalty_and_greedy() -> None:
    logits = torch.tensor([[2.0, 1.5, -1.0]])
    seen = torch.tensor([[True, False, True]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, 1.5, -2.0]]
    params = SamplingParams(repetition_penalty=2.0)
    assert sample(logits, [params], [torch.Generator()], seen).tolist() == [1]
    assert sample(logits, [SamplingParams()], [torch.Generator()], None).tolist() == [0]


def test_each_row_samples_with_its_own_parameters_and_generator() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]] * 3))
    rows = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, seed=7)]

    def draws(order: list[int]) -> list[int]:
        gens = [torch.Generator().manual_seed(7) for _ in order]
        return sample(logits[order], [rows[r] for r in order], gens).tolist()

    alone = [draws([r])[0] for r in range(3)]
    assert alone[:2] == [0, 0]  # greedy, and top-k 1
    assert draws([0, 1, 2]) == alone and draws([2, 1, 0]) == alone[::-1]  # a row's token does not depend on the others
    counts = torch.zeros(4)
    for seed in range(2000):
        counts[sample(logits[:1], [SamplingParams(temperature=1.0)], [torch.Generator().manual_seed(seed)])[0]] += 1
    assert torch.allclose(counts / 2000, torch.tensor([0.5, 0.25, 0.15, 0.1]), atol=0.04)  # the distribution itself
