"""`llamatrt serve` as a user runs it: the real server in a subprocess on a free port, driven by the
official `openai` client (and httpx where the client would hide the status)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.safety_helpers import LLAMATRT
from tests.server_helpers import Server, metric_of

PROMPT = "w5 w17 w42 w8"


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[Server]:
    s = Server(tiny_artifact, "--model-name", "tiny")
    yield s
    s.stop()


def _generate_json(artifact: Path, *args: str) -> dict:
    out = subprocess.run(
        [str(LLAMATRT), "generate", str(artifact), "--no-verify", "--json", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def test_chat_and_completions_streamed_or_not_equal_generate(server: Server, tiny_artifact: Path) -> None:
    client = server.client()
    expected_chat = _generate_json(tiny_artifact, "--chat", "--prompt", PROMPT, "--max-new-tokens", "8")
    expected_text = _generate_json(tiny_artifact, "--prompt", PROMPT, "--max-new-tokens", "8")
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content == expected_chat["text"]
    assert chat.choices[0].finish_reason == expected_chat["finish_reason"]
    assert chat.usage.prompt_tokens == expected_chat["prompt_tokens"]
    assert chat.usage.completion_tokens == len(expected_chat["token_ids"])
    streamed = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_chat["text"]
    assert chunks[-1].usage.completion_tokens == len(expected_chat["token_ids"]) and chunks[-1].choices == []
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert text.choices[0].text == expected_text["text"] and text.object == "text_completion"
    pieces = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == expected_text["text"]


def test_logprobs_in_openai_format(server: Server) -> None:
    chat = server.client().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 3
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert content[0].token == content[0].top_logprobs[0].token  # greedy: the most likely one
    legacy = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.tokens) == 3 and len(legacy.choices[0].logprobs.top_logprobs[0]) == 2


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_sixteen_concurrent_streaming_clients_all_complete_with_their_usage(
    server: Server, tiny_artifact: Path
) -> None:
    prompts = [" ".join(f"w{(k * 11 + i) % 90 + 3}" for i in range(k % 5 + 2)) for k in range(16)]

    def stream(prompt: str) -> tuple[str, int]:
        chunks = list(
            server.client().completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=10,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, prompts))
    for prompt, (text, tokens) in zip(prompts, results, strict=True):
        expected = _generate_json(tiny_artifact, "--prompt", prompt, "--max-new-tokens", "10")
        assert (text, tokens) == (expected["text"], len(expected["token_ids"]))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"temperature": 3}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_an_unsupported_or_bad_parameter_is_a_400_naming_it(server: Server, body: dict, param: str) -> None:
    request = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], **body}
    response = httpx.post(server.url + "/v1/chat/completions", json=request)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert param in response.json()["error"]["message"]


def test_errors_are_openai_shaped(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": PROMPT}])
    with pytest.raises(openai.BadRequestError, match="does not fit the cache"):
        client.completions.create(model="tiny", prompt=" ".join(["w5"] * 40), max_tokens=30)
    too_big = httpx.post(
        server.url + "/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"}
    )
    assert too_big.status_code == 413 and "over" in too_big.json()["error"]["message"]
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    metrics = httpx.get(server.url + "/metrics").text
    for name in (
        "llamatrt_requests_total",
        "llamatrt_time_to_first_token_seconds_bucket",
        "llamatrt_queue_depth",
        "llamatrt_active_rows",
        "llamatrt_inter_token_latency_seconds_count",
        "llamatrt_completion_tokens_total",
    ):
        assert name in metrics, name


def test_a_repeated_prompt_beginning_comes_from_the_prefix_cache_and_says_so(server: Server) -> None:
    """usage.prompt_tokens_details.cached_tokens, as OpenAI reports it, and vLLM's counters of
    prefix-cache queries and hits, in tokens."""
    client = server.client()
    shared = " ".join(f"w{i}" for i in range(5, 30))
    hits_before = metric_of(server.url, "llamatrt_prefix_cache_hits_total")
    answers = []
    for question in ("w40 w41", "w50"):
        reply = client.completions.create(model="tiny", prompt=f"{shared} {question}", max_tokens=4, temperature=0)
        answers.append(reply.usage.prompt_tokens_details.cached_tokens)
        streamed = list(
            client.completions.create(
                model="tiny",
                prompt=f"{shared} {question}",
                max_tokens=4,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert streamed[-1].usage.prompt_tokens_details.cached_tokens >= 16
        assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text
    assert answers[1] >= 16  # the shared beginning, in whole blocks of 16
    assert metric_of(server.url, "llamatrt_prefix_cache_hits_total") - hits_before >= 3 * 16
    assert metric_of(server.url, "llamatrt_prefix_cache_queries_total") > 0
    assert metric_of(server.url, "llamatrt_prefix_cache_bytes") > 0


def test_an_api_key_guards_every_route_but_health(tiny_artifact: Path) -> None:
    s = Server(tiny_artifact, "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert httpx.get(s.url + "/health").status_code == 200
        assert [m.id for m in s.client(api_key="s3cret").models.list().data] == ["b3"]
    finally:
        assert s.stop() == 0


def test_a_disconnected_client_frees_its_row_and_a_full_queue_is_a_429(long_artifact: Path) -> None:
    s = Server(long_artifact, "--max-queue", "1")
    try:
        client = s.client()
        with httpx.stream(
            "POST",
            s.url + "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 2000, "stream": True, "temperature": 0},
        ) as held:
            lines = held.iter_lines()
            for _ in range(4):
                next(lines)  # a few tokens in: it holds the only row
            assert s.metric("llamatrt_active_rows") == 1
        # the client went away: the row is freed, so this one runs now, not after 2000 tokens
        done = client.completions.create(model="c2048", prompt=PROMPT, max_tokens=5, temperature=0)
        assert done.usage.completion_tokens == 5
        assert s.metric("llamatrt_active_rows") == 0 and s.metric("llamatrt_completion_tokens_total") == 5

        def long_request() -> None:
            client.completions.create(model="c2048", prompt=PROMPT, max_tokens=1500, temperature=0)

        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(long_request)
            while s.metric("llamatrt_active_rows") < 1:
                time.sleep(0.01)
            waiting = pool.submit(long_request)
            while s.metric("llamatrt_queue_depth") < 1:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError, match="--max-queue 1"):
                client.completions.create(model="c2048", prompt=PROMPT, max_tokens=5)
            running.result(), waiting.result()
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(long_artifact: Path) -> None:
    s = Server(long_artifact)
    with httpx.stream(
        "POST", s.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 300, "stream": True, "temperature": 0}
    ) as response:
        lines = response.iter_lines()
        next(lines)
        s.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
    assert s.proc.wait(timeout=60) == 0
    time.sleep(0.2)
    assert "Traceback" not in "".join(s.lines), "".join(s.lines)


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_bench_serve_runs_each_workload_and_reads_what_the_server_took_from_its_cache(long_artifact: Path) -> None:
    """`llamatrt bench-serve`'s workloads against the real server (a 2048-slot cache for the
    ~600-token system prompt): every request completes, and the shared beginning and the
    conversation so far are reported as cached from the second request or turn on."""
    from llamatrt.tools.bench_serve import bench_serve

    s = Server(long_artifact)
    try:
        shared = bench_serve(s.url, requests=3, clients=1, workload="shared-prefix")
        chat = bench_serve(s.url, clients=1, workload="chat", turns=3)
        mixed = bench_serve(s.url, clients=2, prompts=[("w5 w6 w7", 4), ("w8 w9", 4), ("w10", 4)])
    finally:
        s.stop()
    assert (shared.completed, shared.errors, chat.completed, chat.errors, mixed.completed) == (3, 0, 3, 0, 3)
    assert shared.prompt_tokens > 3 * 600 and shared.cached_prompt_tokens >= 2 * 592  # 37 blocks of 16, twice
    assert len(chat.ttft_by_turn_ms) == 3 and chat.cached_prompt_tokens > 0
    assert mixed.workload == "mixed" and mixed.ttft_by_turn_ms == [] and mixed.output_tokens_per_s > 0
