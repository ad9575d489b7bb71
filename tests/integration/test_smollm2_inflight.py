"""In-flight batching on SmolLM2: ten requests of different lengths join and leave a B = 4 batch at
different moments, one is cancelled half-way, and every request's greedy tokens equal what the same
request gets alone on the B = 1 artifact (the B = 4 steps run decode rows and prompt slices in one
packed call) (ONNX Runtime; every backend runs the same scenario on the
tiny model in tests/runtime/test_backend_conformance.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import llamatrt
from llamatrt.runtime.registry import open_backend
from llamatrt.runtime.scheduler import Scheduler
from tests.inflight_helpers import alone, assert_each_as_alone, joining_and_leaving

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


def test_requests_joining_and_leaving_a_batch_get_their_tokens_alone(
    smollm2_artifact: Path, smollm2_b4_artifact: Path
) -> None:
    prompts = _prompts(smollm2_artifact)
    assert min(map(len, prompts)) <= 8 and 250 <= max(map(len, prompts)) <= 320
    budgets = [n for _, n in SHAPES]
    with open_backend(smollm2_artifact, verify=False) as backend:
        each_alone = alone(Scheduler(backend), prompts, budgets)
    with open_backend(smollm2_b4_artifact, verify=False) as backend:
        roles: Counter[str] = Counter()
        scheduler = Scheduler(backend, observer=lambda role, seconds, rows: roles.update([role]))
        assert scheduler.prefill_sizes is None  # ONNX Runtime's graph: open tokens
        assert scheduler.packed_graph is not None  # ... which packs them
        together = joining_and_leaving(scheduler, prompts, budgets, every=6, cancelled=CANCELLED)
    assert_each_as_alone(together, each_alone, budgets, CANCELLED)
    assert roles["mixed"] > 10  # decode rows and prompt slices shared calls
