"""`llamatrt bench-serve URL`: a load benchmark for any OpenAI-compatible server.

N concurrent streaming clients (the official `openai` client) send a fixed mixed workload
(runtime.bench_workload's lengths, as text), arriving all at once or at a given rate. Reported:
requests/s, output tokens/s, time to first token and inter-token latency (p50/p99), errors.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from llamatrt.base.progress import Progress, no_progress
from llamatrt.tools.bench_workload import NEW_TOKENS, PROMPT_TOKENS

WORDS = [
    "the",
    "sky",
    "river",
    "stone",
    "light",
    "city",
    "music",
    "garden",
    "window",
    "story",
    "mountain",
    "letter",
    "ocean",
    "forest",
    "bridge",
    "morning",
    "engine",
    "paper",
    "silver",
    "winter",
]


@dataclass(frozen=True)
class ServeReport:
    url: str
    model: str
    requests: int
    clients: int
    rate: float | None  # requests/s offered; None: all at once
    wall_s: float
    completed: int
    errors: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    inter_token_p50_ms: float
    inter_token_p99_ms: float
    error_kinds: dict[str, int] = field(default_factory=dict)  # "TypeName: first line" -> how many

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        offered = "all at once" if self.rate is None else f"{self.rate:g} requests/s"
        return "\n".join(
            [
                f"bench-serve {self.url} ({self.model}): {self.requests} requests, {self.clients} concurrent clients, {offered}",
                f"completed {self.completed}, errors {self.errors}, in {self.wall_s:.1f} s"
                + "".join(f"\n  error x{n}: {kind}" for kind, n in self.error_kinds.items()),
                f"requests/s {self.requests_per_s:.2f}   output tokens/s {self.output_tokens_per_s:.1f}",
                f"time to first token p50 {self.ttft_p50_ms:.0f} ms, p99 {self.ttft_p99_ms:.0f} ms",
                f"inter-token latency p50 {self.inter_token_p50_ms:.1f} ms, p99 {self.inter_token_p99_ms:.1f} ms",
            ]
        )


def mixed_prompts(count: int, seed: int = 20261201) -> list[tuple[str, int]]:
    """(prompt text, max_tokens) pairs: lengths drawn as bench's workload draws them (a word is
    about a token for common English words)."""
    draw = random.Random(seed)
    out = []
    for i in range(count):
        words = draw.randint(*PROMPT_TOKENS)
        text = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))
        out.append((f"Continue this text: {text}", draw.randint(*NEW_TOKENS)))
    return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def _one(client: Any, model: str, prompt: str, max_tokens: int) -> tuple[list[float], int]:
    """One streamed completion: the arrival time of each content chunk, and completion tokens."""
    times, tokens = [], 0
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return times, tokens


async def _run(
    url: str,
    model: str | None,
    api_key: str | None,
    requests: int,
    clients: int,
    rate: float | None,
    prompts: list[tuple[str, int]] | None,
    progress: Progress,
) -> ServeReport:
    import httpx
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=url.rstrip("/") + "/v1" if not url.rstrip("/").endswith("/v1") else url,
        api_key=api_key or "none",
        max_retries=0,
        timeout=600,
        # a fresh connection per request: a server that closes idle keep-alive connections (llama-server
        # does) would otherwise fail a request sent on a pooled one that it just closed
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=600),
    )
    if model is None:
        model = (await client.models.list()).data[0].id
    work = prompts or mixed_prompts(requests)
    limit = asyncio.Semaphore(clients)
    ttfts: list[float] = []
    gaps: list[float] = []
    tokens, errors, done = 0, 0, 0
    kinds: Counter[str] = Counter()
    started = time.perf_counter()

    async def request(k: int, prompt: str, max_tokens: int) -> None:
        nonlocal tokens, errors, done
        if rate is not None:
            await asyncio.sleep(k / rate)
        async with limit:
            sent = time.perf_counter()
            try:
                times, count = await _one(client, model, prompt, max_tokens)
            except Exception as e:  # any failed request counts as an error, whatever the server or client raised
                errors += 1
                kinds[f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"] += 1
                return
            done += 1
            tokens += count
            if times:
                ttfts.append(times[0] - sent)
                gaps.extend(b - a for a, b in itertools.pairwise(times))
            progress(f"request {done + errors} of {len(work)}")

    await asyncio.gather(*(request(k, p, n) for k, (p, n) in enumerate(work)))
    wall = time.perf_counter() - started
    await client.close()
    return ServeReport(
        url,
        model,
        len(work),
        clients,
        rate,
        wall,
        done,
        errors,
        done / wall,
        tokens / wall,
        1000 * statistics.median(ttfts) if ttfts else 0.0,
        1000 * _percentile(ttfts, 99),
        1000 * statistics.median(gaps) if gaps else 0.0,
        1000 * _percentile(gaps, 99),
        dict(kinds),
    )


def bench_serve(
    url: str,
    model: str | None = None,
    api_key: str | None = None,
    requests: int = 32,
    clients: int = 8,
    rate: float | None = None,
    prompts: list[tuple[str, int]] | None = None,
    progress: Progress = no_progress,
) -> ServeReport:
    return asyncio.run(_run(url, model, api_key, requests, clients, rate, prompts, progress))
