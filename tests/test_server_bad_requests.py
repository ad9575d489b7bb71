"""A careless or hostile client against the real `llamatrt serve` (subprocess, free port, raw httpx):
every bad request gets its 4xx with an OpenAI-shaped one-line error naming the parameter, and the
server still answers a correct request afterwards with no row or queue slot left behind."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamatrt.server.app import MAX_DEPTH, _nesting
from tests.server_helpers import PROMPT, Server

MESSAGES = [{"role": "user", "content": PROMPT}]
CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **extra}


def text(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, **extra}


def nested(depth: int) -> bytes:
    return b'{"model": "tiny", "messages": ' + b"[" * depth + b"]" * depth + b"}"


def messages(*content: Any, role: Any = "user") -> dict[str, Any]:
    return {"model": "tiny", "max_tokens": 2, "messages": [{"role": role, "content": c} for c in content]}


# (route, body: a dict sent as JSON or raw bytes, status, the parameter the error names or None)
CASES: list[tuple[str, Any, int, str | None]] = [
    # the body itself
    (CHAT, b"not json", 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, b"", 400, None),
    (CHAT, b'{"model": "tiny", "messages":', 400, None),
    (CHAT, nested(100), 400, None),
    (CHAT, nested(100_000), 400, None),
    (CHAT, b"\xff\xfe{}", 400, None),
    (CHAT, b'"a string"', 400, None),
    (CHAT, json.dumps(chat()).replace('"max_tokens": 2', '"temperature": NaN').encode(), 400, None),
    (CHAT, json.dumps(chat()).replace('"max_tokens": 2', '"repetition_penalty": Infinity').encode(), 400, None),
    (CHAT, json.dumps(chat()).replace('"max_tokens": 2', '"top_p": -Infinity').encode(), 400, None),
    (CHAT, b"x" * (2 << 20), 413, None),
    # messages
    (CHAT, {"model": "tiny"}, 400, "messages"),
    (CHAT, chat(messages=[]), 400, "messages"),
    (CHAT, chat(messages="hi"), 400, "messages"),
    (CHAT, chat(messages=[1]), 400, "messages"),
    (CHAT, chat(messages=[{"content": "hi"}]), 400, "messages"),
    (CHAT, messages("hi", role="tool"), 400, "messages"),
    (CHAT, messages("hi", role="root"), 400, "messages"),
    (CHAT, messages("hi", role=["user"]), 400, "messages"),
    (CHAT, messages(5), 400, "messages"),
    (CHAT, messages(None), 400, "messages"),
    (CHAT, messages({"text": "hi"}), 400, "messages"),
    (CHAT, messages(["hi"]), 400, "messages"),
    (CHAT, messages([{"type": "image_url", "image_url": {"url": "http://x"}}]), 400, "messages"),
    (CHAT, messages([{"type": "text", "text": {"a": 1}}]), 400, "messages"),
    (CHAT, messages([{"type": "text"}]), 400, "messages"),
    (CHAT, messages([{"type": "text", "text": 5}]), 400, "messages"),
    # loose types
    (CHAT, chat(stream="false"), 400, "stream"),
    (CHAT, chat(stream=1), 400, "stream"),
    (CHAT, chat(logprobs="yes"), 400, "logprobs"),
    (CHAT, chat(logprobs=1), 400, "logprobs"),
    (CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options"),
    (CHAT, chat(stream=True, stream_options="x"), 400, "stream_options"),
    (CHAT, chat(stream=True, stream_options={"include_usage": "yes"}), 400, "stream_options"),
    (CHAT, chat(model=["tiny"]), 400, "model"),
    (CHAT, chat(model=5), 400, "model"),
    (CHAT, chat(model="gpt-4"), 404, "model"),
    (CHAT, chat(max_tokens="5"), 400, "max_tokens"),
    (CHAT, chat(max_tokens=0), 400, "max_tokens"),
    (CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    (CHAT, chat(max_tokens=1.5), 400, "max_tokens"),
    (CHAT, chat(max_tokens=True), 400, "max_tokens"),
    (CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    (CHAT, chat(max_tokens=10**30), 400, None),
    (CHAT, chat(temperature="1"), 400, "temperature"),
    (CHAT, chat(temperature=-0.1), 400, "temperature"),
    (CHAT, chat(temperature=2.5), 400, "temperature"),
    (CHAT, chat(temperature=True), 400, "temperature"),
    (CHAT, chat(top_p=0), 400, "top_p"),
    (CHAT, chat(top_p=1.5), 400, "top_p"),
    (CHAT, chat(top_p=-1), 400, "top_p"),
    (CHAT, chat(top_k=-1), 400, "top_k"),
    (CHAT, chat(top_k=1.5), 400, "top_k"),
    (CHAT, chat(top_k=False), 400, "top_k"),
    (CHAT, chat(min_p=1.5), 400, "min_p"),
    (CHAT, chat(min_p=-0.1), 400, "min_p"),
    (CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    (CHAT, chat(repetition_penalty=-1), 400, "repetition_penalty"),
    (CHAT, chat(repetition_penalty="x"), 400, "repetition_penalty"),
    (CHAT, chat(seed=-1), 400, "seed"),
    (CHAT, chat(seed=2**64), 400, "seed"),
    (CHAT, chat(seed="1"), 400, "seed"),
    (CHAT, chat(seed=1.5), 400, "seed"),
    (CHAT, chat(seed=True), 400, "seed"),
    (CHAT, chat(stop=5), 400, "stop"),
    (CHAT, chat(stop=""), 400, "stop"),
    (CHAT, chat(stop=["a", 5]), 400, "stop"),
    (CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (CHAT, chat(stop={"a": 1}), 400, "stop"),
    (CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    (CHAT, chat(logprobs=True, top_logprobs="2"), 400, "top_logprobs"),
    # what llamatrt does not implement is refused, never ignored
    (CHAT, chat(n=2), 400, "n"),
    (CHAT, chat(n=0), 400, "n"),
    (CHAT, chat(tools=[{"type": "function"}]), 400, "tools"),
    (CHAT, chat(response_format={"type": "json_object"}), 400, "response_format"),
    (CHAT, chat(logit_bias={"5": 10}), 400, "logit_bias"),
    (CHAT, chat(frequency_penalty=1), 400, "frequency_penalty"),
    (CHAT, chat(presence_penalty=0.5), 400, "presence_penalty"),
    (CHAT, chat(foo=1), 400, "foo"),
    (CHAT, chat(functions=[]), 400, "functions"),
    # the completions route
    (TEXT, {"model": "tiny"}, 400, "prompt"),
    (TEXT, text(prompt=5), 400, "prompt"),
    (TEXT, text(prompt=[]), 400, "prompt"),
    (TEXT, text(prompt=[True, 1]), 400, "prompt"),
    (TEXT, text(prompt=[[1, True]]), 400, "prompt"),
    (TEXT, text(prompt=[[]]), 400, "prompt"),
    (TEXT, text(prompt=[["a"]]), 400, "prompt"),
    (TEXT, text(prompt=[{"a": 1}]), 400, "prompt"),
    (TEXT, text(prompt=[-1]), 400, None),
    (TEXT, text(prompt=[10**9]), 400, None),
    (TEXT, text(prompt=""), 400, None),
    (TEXT, text(logprobs=6), 400, "logprobs"),
    (TEXT, text(logprobs=True), 400, "logprobs"),
    (TEXT, text(echo=True), 400, "echo"),
    (TEXT, text(best_of=2), 400, "best_of"),
    (TEXT, text(suffix="x"), 400, "suffix"),
    (TEXT, text(prompt=[PROMPT, PROMPT], stream=True), 400, "prompt"),
    (TEXT, text(prompt=" ".join(["w5"] * 60)), 400, None),
    (TEXT, text(max_tokens=100), 400, None),
    (TEXT, text(prompt=[PROMPT, " ".join(["w5"] * 60)]), 400, None),
]


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[Server]:
    s = Server(tiny_artifact, "--model-name", "tiny")
    yield s
    assert s.stop() == 0


def _send(server: Server, route: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(server.url + route, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(server.url + route, json=body, timeout=60)


def _idle(server: Server) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.metric("llamatrt_active_rows") == 0 and server.metric("llamatrt_queue_depth") == 0:
            return True
        time.sleep(0.05)
    return False


def assert_openai_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param and param in error["message"], error


@pytest.mark.parametrize(("route", "body", "status", "param"), CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_a_bad_request_gets_its_error_and_the_server_goes_on(
    server: Server, route: str, body: Any, status: int, param: str | None
) -> None:
    assert_openai_error(_send(server, route, body), status, param)
    good = httpx.post(server.url + CHAT, json=chat(max_tokens=1, temperature=0), timeout=60)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 1
    assert _idle(server)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nope", 404), ("GET", CHAT, 405), ("DELETE", "/v1/models", 405), ("POST", "/health", 405)],
)
def test_unknown_routes_and_methods_are_openai_shaped(server: Server, method: str, path: str, status: int) -> None:
    assert_openai_error(httpx.request(method, server.url + path), status, None)


def test_made_up_paths_add_one_metric_series(server: Server) -> None:
    for k in range(40):
        httpx.get(f"{server.url}/probe/{k}/x")
    text = httpx.get(server.url + "/metrics").text
    assert "/probe/" not in text and 'route="unmatched"' in text
    assert 'route="/v1/chat/completions"' in text


def test_a_sampling_extreme_cannot_stop_the_loop(server: Server) -> None:
    for extreme in (
        {"temperature": 1e-300},
        {"repetition_penalty": 1e-300, "temperature": 1},
        {"repetition_penalty": 1e300, "temperature": 1},
        {"top_p": 1e-300, "temperature": 2},
    ):
        response = httpx.post(server.url + CHAT, json=chat(max_tokens=4, **extreme), timeout=60)
        assert response.status_code == 200, (extreme, response.text)
    assert httpx.get(server.url + "/health").json()["status"] == "ok" and _idle(server)


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b'{"a": [1, {"b": []}], "c": {}}', 4),
        (json.dumps({"a": '\\"' + "[{" * 40 + '"' + "]}" * 40}).encode(), 1),  # text, with an escaped quote
        (json.dumps({"a": ["]]", "\\", ["[[", "\\\\"]]}).encode(), 3),
        (nested(100), MAX_DEPTH + 1),  # it stops counting past the limit
    ],
)
def test_nesting_counts_brackets_outside_strings_only(body: bytes, depth: int) -> None:
    assert _nesting(body) == depth
