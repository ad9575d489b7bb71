"""`llamatrt serve`'s FastAPI application: OpenAI's routes over one Engine.

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent events in OpenAI's
chunk format, ending with `data: [DONE]`, or not), GET /v1/models, /health, /metrics. Errors are
OpenAI-style JSON bodies: 400 a bad parameter or a prompt that cannot fit the cache, 401 without
the API key (when one is set; /health stays open), 404 an unknown model, 413 a body over the
limit, 429 a full queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamatrt.base.errors import ConstraintError, InputError, LlamatrtError
from llamatrt.runtime.llm import TextTracker
from llamatrt.runtime.requests import Request as ScheduledRequest
from llamatrt.runtime.structured import Grammar
from llamatrt.server import protocol
from llamatrt.server.engine import Engine, EngineConfig, GenerationFailed, QueueFull, Submitted, Unavailable
from llamatrt.server.guard import Guard
from llamatrt.server.metrics import Metrics

MAX_BODY = 1 << 20  # bytes: a request body beyond this is a 413
MAX_DEPTH = 32  # nesting of a request body's JSON: no OpenAI request needs more than a few levels
DISCONNECT_POLL_S = 0.05  # how often a non-streamed request checks that its client is still there


class PayloadTooLarge(Exception):
    pass


class ModelNotFound(Exception):
    pass


def create_app(
    config: EngineConfig, api_key: str | None = None, max_body: int = MAX_BODY, open_metrics: bool = False
) -> FastAPI:
    """The application with its engine loaded (so a Ray Serve replica builds one on start). With an
    API key every route but /health needs it (/metrics too, unless `open_metrics`)."""
    metrics = Metrics()
    engine = Engine(config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(title="llamatrt", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> Response:  # unknown routes and methods
        return protocol.error_response(
            error.status_code,
            f"{error.detail}; see /v1/models, /v1/chat/completions, /v1/completions",
            "invalid_request_error" if error.status_code < 500 else "server_error",
        )

    open_paths = frozenset({"/health"} | ({"/metrics"} if open_metrics else set()))
    app.add_middleware(Guard, api_key=api_key, open_paths=open_paths, max_body=max_body, metrics=metrics)

    @app.get("/health")
    async def health() -> Response:
        problem = engine.healthy
        if problem is not None:
            return JSONResponse({"status": "error", "model": engine.model_name, "error": problem}, status_code=503)
        return JSONResponse({"status": "ok", "model": engine.model_name})

    @app.get("/metrics")
    async def exposition() -> Response:
        metrics.observe_queue(engine.scheduler)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": engine.model_name, "object": "model", "created": 0, "owned_by": "llamatrt"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete("chat", request, engine, metrics, max_body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete("completions", request, engine, metrics, max_body)

    return app


async def _body(request: Request, limit: int) -> Any:
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge
        chunks.append(chunk)
    raw = b"".join(chunks)
    if _nesting(raw) > MAX_DEPTH:
        raise protocol.BadRequest(f"the request body nests JSON deeper than {MAX_DEPTH} levels; flatten it")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise protocol.BadRequest(f"the request body is not JSON ({e.msg if hasattr(e, 'msg') else e})") from e
    except RecursionError as e:  # nesting that the check above did not see (the body is not JSON there)
        raise protocol.BadRequest(f"the request body nests JSON deeper than {MAX_DEPTH} levels; flatten it") from e


def _no_constant(name: str) -> Any:
    raise protocol.BadRequest(f"the request body holds {name}, which JSON does not allow; send finite numbers")


def _nesting(raw: bytes) -> int:
    """The deepest nesting of [ and { outside strings (checked before parsing, which recurses).
    Escapes, then strings, then every other byte are dropped at C speed, so Python loops only over
    the brackets: a megabyte prompt is a millisecond here, not 50 ms on the event loop."""
    brackets = _STRING.sub(b"", _ESCAPE.sub(b"", raw)).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        if byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                return deepest
        else:
            depth -= 1
    return deepest


_ESCAPE = re.compile(rb"\\.", re.DOTALL)  # a backslash and what it escapes: never a string's end
_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


async def _complete(kind: str, request: Request, engine: Engine, metrics: Metrics, max_body: int) -> Response:
    try:
        parsed = protocol.parse(kind, await _body(request, max_body))
        if parsed.model is not None and parsed.model != engine.model_name:
            raise ModelNotFound(parsed.model)
        if parsed.stream and len(parsed.prompts) > 1:
            raise protocol.BadRequest("stream with several prompts is not supported; send one prompt", "prompt")
        prompts: list[str | list[int] | None] = [*parsed.prompts] or [None]

        grammar = await asyncio.to_thread(engine.grammar, parsed.response_format, parsed.tools)  # a 400 if it cannot be

        def prepare() -> list[ScheduledRequest]:  # template and tokenizer: seconds on a huge prompt
            return [
                engine.request(
                    engine.encode(p, parsed.messages),
                    parsed.max_tokens,
                    parsed.sampling,
                    parsed.stop,
                    parsed.logprobs,
                    parsed.top_logprobs,
                    grammar,
                )
                for p in prompts
            ]

        requests = await asyncio.to_thread(prepare)  # off the event loop, which serves every stream
        runs = engine.submit(requests)  # all prompts of a request, or none
        if parsed.stream:
            return StreamingResponse(
                _stream(kind, parsed, runs[0], engine, metrics, grammar), media_type="text/event-stream"
            )
        results = await _until_disconnected(request, [_collect(engine, run) for run in runs])
        if results is None:
            return Response(status_code=499)  # nobody reads it; its rows were freed
        return JSONResponse(_response(kind, parsed, results, engine, metrics, grammar))
    except PayloadTooLarge:
        return protocol.error_response(413, f"the request body is over {max_body} bytes; send a smaller one")
    except ModelNotFound as e:
        return protocol.error_response(
            404,
            f"model {e.args[0]!r} is not served here; this server serves {engine.model_name!r}",
            param="model",
            code="model_not_found",
        )
    except QueueFull as e:
        return protocol.error_response(429, str(e), "rate_limit_error")
    except Unavailable as e:
        return protocol.error_response(503, str(e), "server_error")
    except GenerationFailed as e:
        return protocol.error_response(500, str(e), "server_error")
    except protocol.BadRequest as e:
        return protocol.error_response(400, str(e), param=e.param)
    except InputError as e:  # the same validation and wording as the CLI (a prompt over the cache, ...)
        return protocol.error_response(400, str(e))
    except LlamatrtError as e:
        return protocol.error_response(500, str(e), "server_error")


def _tool_call(parsed: protocol.Parsed, result: Any) -> dict[str, Any] | None:
    """The tool call a finished chat answer makes, if tools were offered and it is one; an answer held
    to the call form that is not one would be a broken promise, never sent."""
    tools = parsed.tools
    if tools is None or not tools.offered or result.finish_reason != "stop":
        return None
    call = tools.call_in(result.text)
    if call is None and tools.forced:
        raise ConstraintError("the answer held to the tool-call form is not a call; report this as a bug")
    return call


async def _until_disconnected(request: Request, work: list[Any]) -> list[TextTracker] | None:
    """The results of `work`, or None if the client went away first: then every part is cancelled,
    which frees its row at the next step (as llama.cpp's and vLLM's servers poll for a disconnect)."""
    task = asyncio.ensure_future(asyncio.gather(*work))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, LlamatrtError):
                await task


async def _collect(engine: Engine, run: Submitted) -> TextTracker:
    latest = None
    async with contextlib.aclosing(engine.deltas(run)) as deltas:
        async for _, tracker in deltas:
            latest = tracker
    assert latest is not None
    return latest


def _pieces(engine: Engine, ids: list[int]) -> list[str]:
    return [engine.llm.decode([t]) for t in ids]


def _top(engine: Engine, top: list[list[tuple[int, float]]]) -> list[list[tuple[str, float]]]:
    return [[(engine.llm.decode([t]), v) for t, v in alts] for alts in top]


def _logprobs(
    kind: str, engine: Engine, ids: list[int], logprobs: list[float], top: list[list[tuple[int, float]]]
) -> dict[str, Any]:
    builder = protocol.chat_logprobs if kind == "chat" else protocol.completion_logprobs
    return builder(_pieces(engine, ids), logprobs, _top(engine, top))


def _response(
    kind: str,
    parsed: protocol.Parsed,
    trackers: list[TextTracker],
    engine: Engine,
    metrics: Metrics,
    grammar: Grammar | None = None,
) -> dict[str, Any]:
    choices, prompt_tokens, completion_tokens, cached_tokens = [], 0, 0, 0
    for i, tracker in enumerate(trackers):
        result = engine.llm.checked(tracker.result(parsed.logprobs), grammar)  # never an invalid answer
        prompt_tokens += result.prompt_tokens
        cached_tokens += result.cached_tokens
        completion_tokens += len(result.token_ids)
        logprobs = (
            _logprobs(kind, engine, result.token_ids, result.logprobs or [], result.top_logprobs or [])
            if parsed.logprobs
            else None
        )
        choice: dict[str, Any] = {"index": i, "logprobs": logprobs, "finish_reason": result.finish_reason}
        call = _tool_call(parsed, result)
        if call is not None:
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
            choice["finish_reason"] = "tool_calls"
        elif kind == "chat":
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        choices.append(choice)
    metrics.finished(prompt_tokens, completion_tokens)
    return protocol.envelope(
        kind,
        protocol.response_id(kind),
        engine.model_name,
        engine.fingerprint,
        choices,
        usage_=protocol.usage(prompt_tokens, completion_tokens, cached_tokens),
    )


async def _stream(
    kind: str, parsed: protocol.Parsed, run: Submitted, engine: Engine, metrics: Metrics, grammar: Grammar | None = None
) -> AsyncIterator[str]:
    rid = protocol.response_id(kind)

    def chunk(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
        body = protocol.envelope(
            kind, rid, engine.model_name, engine.fingerprint, [choice] if choice else [], chunk=True, usage_=usage
        )
        return f"data: {json.dumps(body)}\n\n"

    def choice(text: str, finish: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        if kind == "chat":
            return {
                "index": 0,
                "delta": {"content": text} if text or finish is None else {},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

    if kind == "chat":
        yield chunk(
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        )
    sent = 0  # tokens whose logprobs went out already
    tracker: TextTracker | None = None
    tools = parsed.tools if parsed.tools is not None and parsed.tools.offered else None
    deciding, held = tools is not None, ""  # text held back while the answer may be a tool call
    try:
        async with contextlib.aclosing(engine.deltas(run)) as deltas:
            async for delta, tracker in deltas:
                text = delta.text
                if deciding:
                    held, text = held + delta.text, ""
                    if not tools.forced and held.lstrip() and not held.lstrip().startswith("{"):  # type: ignore[union-attr]
                        deciding, held, text = False, "", held  # plain text: what was held goes out now
                    elif delta.finish_reason is None:
                        continue
                logprobs = None
                if parsed.logprobs:
                    ids = tracker.tokens[sent:]
                    logprobs = _logprobs(kind, engine, ids, tracker.logprobs[sent:], tracker.top[sent:])
                    sent = len(tracker.tokens)
                if delta.finish_reason is None:
                    yield chunk(choice(text, None, logprobs))
                    continue
                result = engine.llm.checked(tracker.result(parsed.logprobs), grammar)  # an error event if invalid
                call = _tool_call(parsed, result) if deciding else None
                finish = result.finish_reason
                if call is not None:
                    tool_delta = {"tool_calls": [{"index": 0, **call}]}
                    yield chunk({"index": 0, "delta": tool_delta, "logprobs": logprobs, "finish_reason": None})
                    finish, logprobs = "tool_calls", None
                elif text or held:
                    yield chunk(choice(text + held, None, logprobs))
                    logprobs = None
                yield chunk(choice("", finish, logprobs))
                metrics.finished(result.prompt_tokens, len(result.token_ids))
                if parsed.include_usage:
                    yield chunk(None, protocol.usage(result.prompt_tokens, len(result.token_ids), result.cached_tokens))
    except LlamatrtError as e:  # after the headers went out: say it in the stream, OpenAI-style
        yield f"data: {json.dumps(protocol.error_body(str(e), 'server_error'))}\n\n"
    yield "data: [DONE]\n\n"
