"""The OpenAI HTTP API as llamatrt speaks it: request bodies checked into scheduler requests, and
results turned into OpenAI's response and chunk objects.

Parameters follow OpenAI's definitions (defaults included: temperature 1); llamatrt's extras
(`top_k`, `min_p`, `repetition_penalty`) are accepted too. A parameter this server does not
implement (`n > 1`, `logit_bias`, ...) is refused with a 400 naming it, never ignored silently;
`tools` and `tool_choice` (chat) are answered in llamatrt.server.tools' documented form;
`response_format` (chat: `json_object`, or `json_schema` with a schema the grammar engine enforces
exactly) holds the answer to it; ones that change nothing in the output (`user`, `store`, `metadata`) are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from llamatrt.base.errors import InputError
from llamatrt.runtime.sampling_params import SAMPLING_FIELDS, SamplingError, SamplingParams, field_kind

# Accepted and ignored: they do not change what is generated.
NO_EFFECT = frozenset({"user", "store", "metadata", "service_tier", "stream_options", "parallel_tool_calls"})
# The keys each endpoint implements.
COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "stop",
        "stream",
        "n",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        *SAMPLING_FIELDS,  # every SamplingParams field, by its own name
    }
)
CHAT = COMMON | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
}
COMPLETIONS = COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}
# Keys that are implemented only at their neutral value.
NEUTRAL = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": None,
    "suffix": None,
}
MAX_STOPS = 4  # as OpenAI


class BadRequest(InputError):
    """A 400: `param` names the offending parameter, as OpenAI's error bodies do."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Parsed:
    """What one request body asks for, checked."""

    kind: str  # "chat" | "completions"
    prompts: list[str | list[int]]  # completions may send several; chat one conversation
    messages: list[dict[str, str]] | None
    max_tokens: int | None
    sampling: dict[str, Any]
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    model: str | None
    response_format: dict[str, Any] | None = None  # {"type": "json_object"} or {"type": "json_schema", "schema": ...}
    tools: Any = None  # llamatrt.server.tools.Tools: the functions the answer may call, and how


def _number(
    body: dict[str, Any], key: str, default: Any, kind: type, low: float | None = None, high: float | None = None
) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"{key} must be an integer, got {value!r}", key)
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise BadRequest(f"{key} must be a number, got {value!r}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f"in [{low}, {high}]"
            if low is not None and high is not None
            else f"at least {low}"
            if high is None
            else f"at most {high}"
        )
        raise BadRequest(f"{key} must be {bounds}, got {value!r}", key)
    return kind(value)


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """Every SamplingParams field, by its name and type, at OpenAI's default where it differs from
    ours (temperature 1) and within OpenAI's maximum (temperature 2); then checked by
    `SamplingParams.checked`, whose error names the field."""
    sampling = {}
    for f in dataclasses.fields(SamplingParams):
        api = f.metadata
        sampling[f.name] = _number(
            body, f.name, api.get("api_default", f.default), field_kind(f.name), None, api.get("api_max")
        )
    try:
        SamplingParams(**sampling).checked()
    except SamplingError as e:
        raise BadRequest(e.api_message, e.field) from e
    return sampling


def _response_format(raw: Any) -> dict[str, Any] | None:
    """OpenAI's response_format: None for text, else the kind and, for json_schema, the schema."""
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise BadRequest(
            'response_format must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
            '"json_schema": {"name": ..., "schema": {...}}}',
            "response_format",
        )
    spec = raw.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise BadRequest("response_format.json_schema needs a name (a string) and a schema", "response_format")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise BadRequest("response_format.json_schema.schema must be a JSON object (a schema)", "response_format")
    if not isinstance(spec.get("strict", False), bool | None):
        raise BadRequest("response_format.json_schema.strict must be true or false", "response_format")
    return {"type": "json_schema", "schema": schema}


def _flag(body: dict[str, Any], key: str) -> bool:
    """A boolean parameter: true, false or absent/null; never a string or a number."""
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false, got {value!r}", key)
    return bool(value)


def _check_keys(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for key, value in body.items():
        if key in NO_EFFECT:
            continue
        if key not in allowed:
            raise BadRequest(f"parameter {key!r} is not supported by llamatrt serve; remove it", key)
        if key in NEUTRAL and value is not None and value != NEUTRAL[key] and value != {}:
            raise BadRequest(
                f"parameter {key}={value!r} is not supported by llamatrt serve (only {NEUTRAL[key]!r}); remove it", key
            )


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
    out, called = [], False  # called: an assistant message with tool_calls came before
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] needs a role of {', '.join(ROLES)}", "messages")
        content = message.get("content")
        if message["role"] == "assistant" and content is None and message.get("tool_calls"):
            content, called = _calls_text(message["tool_calls"], i), True
        if message["role"] == "tool" and not (called and isinstance(message.get("tool_call_id"), str)):
            raise BadRequest(
                f"messages[{i}] is a tool result, which needs a tool_call_id answering an earlier assistant "
                "message's tool_calls",
                "messages",
            )
        if isinstance(content, list):  # content parts: text only
            if any(
                not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                for p in content
            ):
                raise BadRequest(
                    f"messages[{i}].content has a part that is not text; send "
                    '{"type": "text", "text": "..."} parts only',
                    "messages",
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be text", "messages")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": content})
    return out


ROLES = ("system", "user", "assistant", "developer", "tool")


def _calls_text(calls: Any, i: int) -> str:
    """An earlier assistant turn's tool calls, as the model wrote them (llamatrt.server.tools' form)."""
    try:
        return "\n".join(
            json.dumps({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])})
            for c in calls
        )
    except (TypeError, KeyError, ValueError) as e:
        raise BadRequest(
            f'messages[{i}].tool_calls must be [{{"function": {{"name": ..., "arguments": "<JSON>"}}}}]', "messages"
        ) from e


def _prompts(raw: Any) -> list[str | list[int]]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(_token(t) for t in raw):
        return [list(raw)]
    if isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        return list(raw)
    if isinstance(raw, list) and raw and all(isinstance(p, list) and p and all(_token(t) for t in p) for p in raw):
        return [list(p) for p in raw]
    raise BadRequest("prompt must be a string, a list of strings, or token ids", "prompt")


def _token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse(kind: str, body: Any) -> Parsed:
    """Check a request body of the chat or completions endpoint."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _check_keys(body, CHAT if kind == "chat" else COMPLETIONS)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else [] if stop is None else None
    if stops is None or any(not isinstance(s, str) or not s for s in stops) or len(stops) > MAX_STOPS:
        raise BadRequest(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise BadRequest("stream_options is only allowed with stream: true", "stream_options")
    options = options or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest('stream_options must be an object such as {"include_usage": true}', "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"model must be a string, got {model!r}", "model")
    tools = None
    if kind == "chat":
        from llamatrt.server.tools import parse_tools, with_tools

        tools = parse_tools(body)
        if tools is not None and tools.forced and body.get("response_format") not in (None, {"type": "text"}):
            raise BadRequest(
                "a forced tool call and a response_format cannot both hold the answer; send one", "tool_choice"
            )
        messages, prompts = with_tools(_messages(body.get("messages")), tools), []
        max_tokens = _number(body, "max_completion_tokens", None, int, 1) or _number(body, "max_tokens", None, int, 1)
        logprobs = _flag(body, "logprobs")
        top = _number(body, "top_logprobs", 0, int, 0, 20)
        if top and not logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    else:
        messages, prompts = None, _prompts(body.get("prompt"))
        max_tokens = _number(body, "max_tokens", 16, int, 1)  # OpenAI's default for completions
        top = _number(body, "logprobs", None, int, 0, 5)
        logprobs, top = top is not None, top or 0
    sampling = _sampling(body)
    return Parsed(
        kind,
        prompts,
        messages,
        max_tokens,
        sampling,
        tuple(stops),
        stream,
        bool(options.get("include_usage") or False),
        logprobs,
        top,
        model,
        _response_format(body.get("response_format")) if kind == "chat" else None,
        tools,
    )


def response_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},  # from the prefix cache
    }


def chat_logprobs(
    pieces: Sequence[str], logprobs: Sequence[float], top: Sequence[Sequence[tuple[str, float]]]
) -> dict[str, Any]:
    """OpenAI's chat `logprobs.content`: one entry per token, with its alternatives."""

    def entry(piece: str, value: float) -> dict[str, Any]:
        return {"token": piece, "logprob": value, "bytes": list(piece.encode("utf-8"))}

    content = []
    for k, (piece, value) in enumerate(zip(pieces, logprobs, strict=True)):
        content.append(
            {**entry(piece, value), "top_logprobs": [entry(p, v) for p, v in (top[k] if k < len(top) else ())]}
        )
    return {"content": content}


def completion_logprobs(
    pieces: Sequence[str], logprobs: Sequence[float], top: Sequence[Sequence[tuple[str, float]]]
) -> dict[str, Any]:
    """OpenAI's legacy completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {
        "tokens": list(pieces),
        "token_logprobs": list(logprobs),
        "top_logprobs": [dict(alts) for alts in top] if top else None,
        "text_offset": offsets,
    }


def envelope(
    kind: str,
    rid: str,
    model: str,
    fingerprint: str,
    choices: list[dict[str, Any]],
    chunk: bool = False,
    usage_: dict[str, int] | None = None,
) -> dict[str, Any]:
    obj = {"chat": "chat.completion", "completions": "text_completion"}[kind] + (
        ".chunk" if chunk and kind == "chat" else ""
    )
    out: dict[str, Any] = {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }
    if usage_ is not None or not chunk:
        out["usage"] = usage_
    return out


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
