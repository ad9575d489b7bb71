"""In-flight batching on SmolLM2: ten requests of different lengths join and leave a B = 4 batch at
different moments, one is cancelled half-way, and every request's greedy tokens equal what the same
request gets alone on the B = 1 artifact, on ONNX Runtime and on the PyTorch backend."""

from __future__ import annotations

from pathlib import Path

import pytest

import llamatrt
from llamatrt.runtime.registry import open_backend
from llamatrt.runtime.scheduler import Request, Scheduler

pytestmark = pytest.mark.slow

TEXT = (
    "The history of astronomy is long. Early people watched the sky and tracked the Sun, the Moon and the "
    "planets. They built calendars and temples aligned with the solstices. Later, telescopes showed moons "
    "around Jupiter and phases of Venus, and the idea of a universe centred on the Sun took hold. "
)
# (prompt words, new tokens): prompts from 5 to about 300 tokens, budgets from 8 to 200
SHAPES = [(5, 8), (250, 200), (20, 40), (90, 120), (8, 16), (45, 64), (60, 90), (12, 30), (150, 150), (30, 24)]
CANCELLED = 3  # this one is cancelled after half its tokens


def _prompts(artifact: Path) -> list[list[int]]:
    with llamatrt.load(artifact, "torch", verify=False) as llm:
        words = (TEXT * 8).split()
        return [llm.encode(" ".join(words[:n])) for n, _ in SHAPES]


def _alone(artifact: Path, kind: str, prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
    with open_backend(artifact, kind, verify=False) as backend:
        scheduler = Scheduler(backend)
        out = []
        for prompt, budget in zip(prompts, budgets, strict=True):
            handle = scheduler.submit(Request(prompt, max_new_tokens=budget, use_eos=False))
            out.append([s.token_id for s in scheduler.run([handle]) if s.token_id is not None])
        return out


def _together(artifact: Path, kind: str, prompts: list[list[int]], budgets: list[int]) -> dict[int, list[int]]:
    """Four requests at first, then one more every six loop iterations; CANCELLED is cancelled once
    it has half its tokens."""
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    with open_backend(artifact, kind, verify=False) as backend:
        scheduler = Scheduler(backend)
        assert scheduler.prefill_sizes is None if kind == "onnxruntime" else scheduler.prefill_sizes == [16, 128]
        pending = list(range(len(prompts)))
        handles = {}
        iteration = 0
        while pending or not scheduler.idle:
            if pending and (len(handles) < 4 or iteration % 6 == 0):
                i = pending.pop(0)
                handles[i] = scheduler.submit(Request(prompts[i], max_new_tokens=budgets[i], use_eos=False), i)
            for step in scheduler.step():
                if step.token_id is not None:
                    tokens[step.index].append(step.token_id)
            if CANCELLED in handles and len(tokens[CANCELLED]) == budgets[CANCELLED] // 2:
                handles[CANCELLED].cancel()
            iteration += 1
        assert max(len(scheduler.rows), scheduler.active_rows) == 4
    return tokens


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
def test_requests_joining_and_leaving_a_batch_get_their_tokens_alone(
    kind: str, smollm2_artifact: Path, smollm2_b4_artifact: Path
) -> None:
    prompts = _prompts(smollm2_artifact)
    assert min(map(len, prompts)) <= 8 and 250 <= max(map(len, prompts)) <= 320
    budgets = [n for _, n in SHAPES]
    if kind == "torch":  # its attention reads all C slots at every step: six requests, short answers
        prompts, budgets = prompts[:6], [min(n, 16) for n in budgets[:6]]
    alone = _alone(smollm2_artifact, kind, prompts, budgets)
    together = _together(smollm2_b4_artifact, kind, prompts, budgets)
    for i, expected in enumerate(alone):
        if i == CANCELLED:
            assert together[i] == expected[: budgets[i] // 2]  # cut where it was cancelled, right until then
        else:
            assert together[i] == expected, f"request {i}"
