"""Checks of the graph contract on an artifact's backend, each against another path to the same
numbers: padding, chunking and rows at different positions in one call must not change logits; the
cache's last slot works and one more is refused; a fully masked row gives no NaN."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llamatrt.base.errors import InputError
from llamatrt.runtime.backend import Backend
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.kv_state import KVState
from llamatrt.tools.report import CheckResult
from llamatrt.tools.teacher_forcing import score


def _token_by_token(gen: Generator, prompt: Sequence[int]) -> torch.Tensor:
    """Logits after `prompt` computed through the decode graph one token at a time (no padding, no chunks)."""
    return score(gen, [prompt[:1]], [[*prompt[1:], 0]])[0][-1]


def _within(name: str, a: torch.Tensor, b: torch.Tensor, tolerance: float, backend: Backend) -> CheckResult:
    error = float((a.float() - b.float()).abs().max())
    return CheckResult(
        f"{name} [{backend.name}]", error <= tolerance, f"max |diff| {error:.3g} (tolerance {tolerance:g})"
    )


def run_contract_checks(backend: Backend, prompts: list[list[int]], tolerance: float) -> list[CheckResult]:
    gen = Generator(backend)
    chunk = gen.scheduler.prefill_chunk
    sizes = backend.seq_sizes("prefill", batch=1)
    short = min(prompts, key=len)[: None if sizes is None else sizes[-1] - 1]  # room for padding in one call
    checks = [
        _within(
            "left padding equals no padding",
            _left_padded(backend, short),
            _token_by_token(gen, short),
            tolerance,
            backend,
        )
    ]
    long = max(prompts, key=len)
    if len(long) > chunk:
        chunked = score(gen, [long], [[0]])[0][0]
        checks.append(
            _within("chunked prefill equals token-by-token", chunked, _token_by_token(gen, long), tolerance, backend)
        )
    if backend.manifest.batch_size > 1 and len(prompts) > 1:
        # distinct lengths, so the rows of every decode call sit at different positions
        rows = [p[: len(p) - i] for i, p in enumerate(sorted(prompts, key=len, reverse=True)) if len(p) > i]
        together = score(gen, rows, [[0, 0, 0]] * len(rows))
        alone = [score(gen, [p], [[0, 0, 0]])[0] for p in rows]
        worst = max(range(len(rows)), key=lambda i: float((together[i] - alone[i]).abs().max()))
        checks.append(
            _within(
                "rows at different positions in one decode call equal each row alone",
                together[worst],
                alone[worst],
                tolerance,
                backend,
            )
        )
    checks += [_last_slot(backend), _fully_masked_row(backend)]
    return checks


def _left_padded(backend: Backend, prompt: list[int]) -> torch.Tensor:
    """Logits after `prompt` prefilled in one call at slots pad .. pad + n - 1 of a row whose first
    `pad` slots are masked padding (what a static prefill wider than the prompt does)."""
    sizes = backend.seq_sizes("prefill", batch=1)
    width = len(prompt) + 3 if sizes is None else min(s for s in sizes if s > len(prompt))
    pad = width - len(prompt)
    graph = backend.graph("prefill", 1, None if sizes is None else width)
    kv = KVState(backend)
    kv.reset_row(0, pad)
    ids = torch.tensor([0] * pad + prompt, dtype=torch.long)
    positions = (torch.arange(width) - pad).clamp(min=0)
    return backend.run(graph.name, kv.prefill_feeds(graph, 0, ids, positions, 0))["logits"][0].float().cpu().clone()


def _decode_feeds(backend: Backend, slot: int, mask_value: int) -> dict[str, torch.Tensor]:
    """One decode call of every row at `slot`, with the whole attention mask set to `mask_value`."""
    kv = KVState(backend)
    kv.attention_mask.fill_(mask_value)
    batch = backend.manifest.batch_size
    tokens, positions = torch.ones(batch, dtype=torch.long), torch.full((batch,), slot)
    return kv.decode_feeds(backend.graph("decode"), tokens, positions, positions)


def _last_slot(backend: Backend) -> CheckResult:
    last = backend.manifest.max_cache_len - 1
    decode = backend.graph("decode").name
    finite = bool(torch.isfinite(backend.run(decode, _decode_feeds(backend, last, 1))["logits"]).all())
    try:
        backend.run(decode, _decode_feeds(backend, last + 1, 1))
        refused = False
    except InputError:
        refused = True
    return CheckResult(
        f"last cache slot works, one more is refused [{backend.name}]",
        finite and refused,
        f"slot {last}: {'finite' if finite else 'NON-FINITE'} logits; slot {last + 1}: "
        f"{'refused' if refused else 'ACCEPTED'}",
    )


def _fully_masked_row(backend: Backend) -> CheckResult:
    logits = backend.run(backend.graph("decode").name, _decode_feeds(backend, 0, 0))["logits"]
    finite = bool(torch.isfinite(logits).all())
    return CheckResult(
        f"fully masked row gives no NaN [{backend.name}]", finite, "finite logits" if finite else "NaN/inf logits"
    )
