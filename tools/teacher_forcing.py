"""Teacher-forced logits through the serving loop: the diff and the export check feed the
reference's tokens instead of sampling, and keep every step's logits. A token choice passed to the
loop, so the loop itself knows nothing of it, and the logits come from the very prefill and decode
calls generation makes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llamatrt.base.errors import InputError
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.requests import Request
from llamatrt.runtime.scheduler import Row


class TeacherForcing:
    """Feeds request k the tokens forced[k] in order and keeps the logits each was chosen from."""

    def __init__(self, forced: Sequence[Sequence[int]]) -> None:
        self.forced = [list(f) for f in forced]
        self.logits: list[list[torch.Tensor]] = [[] for _ in forced]

    def __call__(self, rows: Sequence[Row], logits: torch.Tensor) -> list[int]:
        tokens = []
        for row, row_logits in zip(rows, logits, strict=True):
            index = row.handle.index
            self.logits[index].append(row_logits.clone())
            tokens.append(self.forced[index][len(row.generated)])
        return tokens


def score(
    generator: Generator, prompts: Sequence[Sequence[int]], forced: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Teacher-forced logits per prompt, (len(forced), vocab): row k predicts forced[k] (after the
    prompt, then after each forced token but the last), all prompts in flight at once, on the
    generator's own loop and cache."""
    if len(forced) != len(prompts) or len({len(f) for f in forced}) != 1:
        raise InputError("score() needs one forced-token list per prompt, all of the same length")
    choice = TeacherForcing(forced)
    requests = [Request(list(p), max_new_tokens=len(forced[0]), use_eos=False) for p in prompts]
    with generator.scheduler.choosing(choice):
        for _ in generator.run(requests):
            pass
    return [torch.stack(rows) for rows in choice.logits]
