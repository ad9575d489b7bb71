"""In-flight batching scenarios the tiny-model and SmolLM2 tests share: requests that join a running
batch at different moments, one cancelled half-way, and each one's tokens alone for comparison."""

from __future__ import annotations

from llamatrt.runtime.scheduler import Request, Scheduler


def alone(scheduler: Scheduler, prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
    """Each request's greedy tokens with the loop to itself."""
    out = []
    for prompt, budget in zip(prompts, budgets, strict=True):
        handle = scheduler.submit(Request(prompt, max_new_tokens=budget, use_eos=False))
        out.append([s.token_id for s in scheduler.run([handle]) if s.token_id is not None])
    return out


def joining_and_leaving(
    scheduler: Scheduler, prompts: list[list[int]], budgets: list[int], every: int, cancelled: int
) -> dict[int, list[int]]:
    """A request for each free row at first, then one more every `every` loop iterations;
    `cancelled` is cancelled once it has half its tokens. Checks every row was used."""
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    rows = len(scheduler.rows)
    pending, handles, iteration = list(range(len(prompts))), {}, 0
    while pending or not scheduler.idle:
        if pending and (len(handles) < rows or iteration % every == 0):
            i = pending.pop(0)
            handles[i] = scheduler.submit(Request(prompts[i], max_new_tokens=budgets[i], use_eos=False), i)
        for step in scheduler.step():
            if step.token_id is not None:
                tokens[step.index].append(step.token_id)
        if cancelled in handles and len(tokens[cancelled]) == budgets[cancelled] // 2:
            handles[cancelled].cancel()
        iteration += 1
    assert max(len(scheduler.rows), scheduler.active_rows) == rows
    return tokens


def assert_each_as_alone(
    together: dict[int, list[int]], alone_tokens: list[list[int]], budgets: list[int], cancelled: int
) -> None:
    for i, expected in enumerate(alone_tokens):
        if i == cancelled:
            assert together[i] == expected[: budgets[i] // 2], i  # cut where it was cancelled, right until then
        else:
            assert together[i] == expected, f"request {i}"
