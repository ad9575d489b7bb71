"""`llamatrt bench-serve URL`: a load benchmark for any OpenAI-compatible server.

N concurrent streaming clients (the official `openai` client) send one of three fixed workloads,
arriving all at once or at a given rate: `mixed` (runtime.bench_workload's lengths, as text),
`shared-prefix` (one long system prompt, then a short question of each request's own: what a
prefix cache is for) and `chat` (N conversations of several turns, each turn's prompt the whole
conversation so far). Reported: requests/s, output tokens/s, time to first token (p50/p99, and per
turn for `chat`) and inter-token latency (p50/p99), the prompt tokens the server says it took from
its cache, errors.
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
    workload: str = "mixed"
    prompt_tokens: int = 0  # as the server's usage counts them
    cached_prompt_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens, where the server says
    ttft_by_turn_ms: list[float] = field(default_factory=list)  # `chat`: the p50 of each turn

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
                f"prompt tokens {self.prompt_tokens}, of them from the server's cache {self.cached_prompt_tokens}",
                *(
                    [f"time to first token p50 by turn: {', '.join(f'{t:.0f}' for t in self.ttft_by_turn_ms)} ms"]
                    if self.ttft_by_turn_ms
                    else []
                ),
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


WORKLOADS = ("mixed", "shared-prefix", "chat")
SYSTEM_WORDS = 600  # the shared system prompt: about 600 tokens
QUESTION_WORDS = 20


def _words(start: int, count: int) -> str:
    return " ".join(WORDS[(start * 7 + k * 3) % len(WORDS)] for k in range(count))


def shared_prefix_prompts(count: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens): one system prompt of about 600 tokens, then a 20-word question of its own."""
    system = f"You are a helpful assistant. Here are the notes you answer from: {_words(0, SYSTEM_WORDS)}."
    return [(f"{system}\nQuestion {i}: {_words(i + 1, QUESTION_WORDS)}?\nAnswer:", 32) for i in range(count)]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class _Streamed:
    times: list[float] = field(default_factory=list)  # arrival of each content chunk
    text: str = ""
    tokens: int = 0  # completion tokens
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def take_usage(self, usage: Any) -> None:
        if usage is None:
            return
        self.tokens, self.prompt_tokens = usage.completion_tokens, usage.prompt_tokens
        details = getattr(usage, "prompt_tokens_details", None)
        self.cached_tokens = int(getattr(details, "cached_tokens", 0) or 0) if details is not None else 0


async def _one(client: Any, model: str, max_tokens: int, prompt: str | list[dict[str, str]]) -> _Streamed:
    """One streamed completion of a prompt (text), or chat completion of a conversation (messages)."""
    chat = not isinstance(prompt, str)
    create = client.chat.completions.create if chat else client.completions.create
    stream = await create(
        model=model,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **({"messages": prompt} if chat else {"prompt": prompt}),
    )
    out = _Streamed()
    async for chunk in stream:
        text = (chunk.choices[0].delta.content if chat else chunk.choices[0].text) if chunk.choices else None
        if text:
            out.times.append(time.perf_counter())
            out.text += text
        out.take_usage(chunk.usage)
    return out


async def _run(
    url: str,
    model: str | None,
    api_key: str | None,
    requests: int,
    clients: int,
    rate: float | None,
    prompts: list[tuple[str, int]] | None,
    progress: Progress,
    workload: str = "mixed",
    turns: int = 6,
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
        # (openai's annotations name its vendored httpx; an httpx client is what it runs on here)
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=600),  # type: ignore[arg-type]
    )
    if model is None:
        model = (await client.models.list()).data[0].id
    work = prompts or (shared_prefix_prompts(requests) if workload == "shared-prefix" else mixed_prompts(requests))
    limit = asyncio.Semaphore(clients)
    ttfts: list[float] = []
    by_turn: list[list[float]] = [[] for _ in range(turns)]
    gaps: list[float] = []
    tokens, prompt_tokens, cached, errors, done = 0, 0, 0, 0, 0
    kinds: Counter[str] = Counter()
    started = time.perf_counter()

    def count(sent: float, streamed: _Streamed) -> None:
        nonlocal tokens, prompt_tokens, cached, done
        done += 1
        tokens, prompt_tokens, cached = (
            tokens + streamed.tokens,
            prompt_tokens + streamed.prompt_tokens,
            cached + streamed.cached_tokens,
        )
        if streamed.times:
            ttfts.append(streamed.times[0] - sent)
            gaps.extend(b - a for a, b in itertools.pairwise(streamed.times))
        progress(f"request {done + errors} of {len(work) if workload != 'chat' else clients * turns}")

    def failed(e: Exception) -> None:
        nonlocal errors
        errors += 1  # any failed request counts as an error, whatever the server or client raised
        kinds[f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"] += 1

    async def request(k: int, prompt: str, max_tokens: int) -> None:
        if rate is not None:
            await asyncio.sleep(k / rate)
        async with limit:
            sent = time.perf_counter()
            try:
                streamed = await _one(client, model, max_tokens, prompt)
            except Exception as e:
                return failed(e)
            count(sent, streamed)

    async def conversation(k: int) -> None:
        """`turns` turns; each sends the conversation so far, the answers included."""
        messages = [{"role": "system", "content": f"You are assistant {k}. Answer briefly."}]
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Tell me about {_words(k * turns + turn, QUESTION_WORDS)}."})
            sent = time.perf_counter()
            try:
                streamed = await _one(client, model, 32, messages)
            except Exception as e:
                return failed(e)
            count(sent, streamed)
            if streamed.times:
                by_turn[turn].append(streamed.times[0] - sent)
            messages.append({"role": "assistant", "content": streamed.text})

    if workload == "chat":
        await asyncio.gather(*(conversation(k) for k in range(clients)))
    else:
        await asyncio.gather(*(request(k, p, n) for k, (p, n) in enumerate(work)))
    wall = time.perf_counter() - started
    await client.close()
    return ServeReport(
        url,
        model,
        clients * turns if workload == "chat" else len(work),
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
        workload,
        prompt_tokens,
        cached,
        [1000 * statistics.median(t) if t else 0.0 for t in by_turn] if workload == "chat" else [],
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
    workload: str = "mixed",
    turns: int = 6,
) -> ServeReport:
    """`workload`: one of WORKLOADS; `turns` the turns of each `chat` conversation (one per client)."""
    return asyncio.run(_run(url, model, api_key, requests, clients, rate, prompts, progress, workload, turns))
