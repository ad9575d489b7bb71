"""Structured output and tool calls through the real server and the official `openai` client, on a
tiny model whose byte-level vocabulary spells any JSON: answers held to their schema, refusals as
400s naming what the engine cannot enforce, a 30-schema suite, tool calls each way."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import shared_folder
from tests.server_helpers import Server, metric_of


@pytest.fixture(scope="module")
def json_server(tmp_path_factory) -> Iterator[Server]:
    """The server over a tiny model whose byte-level vocabulary spells any JSON."""
    from tests.runtime.test_structured import make_json_artifact

    s = Server(shared_folder(tmp_path_factory, "json-artifact", make_json_artifact) / "art", "--model-name", "j")
    yield s
    s.stop()


SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"enum": ["x", "y"]}},
    "required": ["a", "b"],
    "additionalProperties": False,
}


def test_response_format_holds_the_answer_to_the_schema_streamed_or_not(json_server: Server) -> None:
    import jsonschema

    client = json_server.client()
    messages = [{"role": "user", "content": "give me a and b"}]
    response_format = {"type": "json_schema", "json_schema": {"name": "ab", "schema": SCHEMA, "strict": True}}
    reply = client.chat.completions.create(
        model="j", messages=messages, response_format=response_format, max_tokens=64, temperature=0
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    chunks = list(
        client.chat.completions.create(
            model="j", messages=messages, response_format=response_format, max_tokens=64, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    anything = client.chat.completions.create(
        model="j", messages=messages, response_format={"type": "json_object"}, max_tokens=128, temperature=0
    )
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    assert metric_of(json_server.url, "llamatrt_constrained_requests_total") >= 3
    assert metric_of(json_server.url, "llamatrt_constrained_validation_failures_total") == 0


@pytest.mark.parametrize(
    ("schema", "named"),
    [({"type": "array", "uniqueItems": True}, "uniqueItems"), ({"type": "string", "format": "nope"}, "nope")],
)
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_it(json_server: Server, schema: dict, named: str) -> None:
    body = {
        "model": "j",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    response = httpx.post(json_server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format" and named in error["message"]
    ok = json_server.client().chat.completions.create(model="j", messages=body["messages"], max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")  # the server goes on


def test_a_suite_of_schemas_people_send_each_answer_validates_or_says_it_was_cut(json_server: Server) -> None:
    """The 30 schemas of tools/bench_structured.py through the official client: no answer that claims
    to be complete fails its schema; what the engine cannot enforce is refused up front."""
    from llamatrt.tools.bench_structured import SCHEMAS, run_schemas

    report = run_schemas(json_server.url, max_tokens=96)
    assert len(SCHEMAS) >= 30 and report.schemas == len(SCHEMAS)
    assert report.invalid == 0 and report.errors == 0, report
    assert report.valid + report.cut + report.refused == len(SCHEMAS)
    assert report.valid >= len(SCHEMAS) // 2, report  # most end within the budget even with random weights
    assert metric_of(json_server.url, "llamatrt_constrained_validation_failures_total") == 0


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": NO_ARGUMENTS}}


def _assert_call(call, names: set[str]) -> None:
    import jsonschema

    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    schema = WEATHER["function"]["parameters"] if call.function.name == "get_weather" else NO_ARGUMENTS
    jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_call_comes_back_as_tool_calls_streamed_or_not(json_server: Server, choice) -> None:
    client = json_server.client()
    messages = [{"role": "user", "content": "weather in Paris?"}]
    names = {"get_weather"} if isinstance(choice, dict) else {"get_weather", "get_time"}
    reply = client.chat.completions.create(
        model="j", messages=messages, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=96, temperature=0
    )
    assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
    (call,) = reply.choices[0].message.tool_calls
    _assert_call(call, names)
    chunks = list(
        client.chat.completions.create(
            model="j",
            messages=messages,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            max_tokens=96,
            temperature=0,
            stream=True,
        )
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert (deltas[0].function.name, deltas[0].function.arguments) == (call.function.name, call.function.arguments)
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)  # the call is not sent as text


def test_tool_choice_none_and_auto_and_a_conversation_with_tool_results(json_server: Server) -> None:
    client = json_server.client()
    messages = [{"role": "user", "content": "weather in Paris?"}]
    none = client.chat.completions.create(
        model="j", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=8
    )
    assert none.choices[0].message.tool_calls is None and isinstance(none.choices[0].message.content, str)
    auto = client.chat.completions.create(model="j", messages=messages, tools=[WEATHER], max_tokens=48, temperature=0)
    if auto.choices[0].message.tool_calls:
        _assert_call(auto.choices[0].message.tool_calls[0], {"get_weather"})
        assert auto.choices[0].finish_reason == "tool_calls"
    else:
        assert isinstance(auto.choices[0].message.content, str)
    history = [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    after = client.chat.completions.create(
        model="j", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=8
    )
    assert after.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "u", "parameters": {"type": "array", "uniqueItems": True}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
)
def test_bad_tools_are_a_400_naming_them(json_server: Server, extra: dict, param: str) -> None:
    body = {"model": "j", "messages": [{"role": "user", "content": "hi"}], **extra}
    response = httpx.post(json_server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
