"""What every HTTP request passes before a route: the API key, the body's declared size, and the
request counter by route template.

A plain ASGI middleware, not FastAPI's `@app.middleware("http")`: that one (Starlette's
BaseHTTPMiddleware) hands the route a `receive` that never reports the client's disconnect, so a
non-streamed request could not notice its client going away.
"""

from __future__ import annotations

import hmac
from collections.abc import MutableMapping
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from llamatrt.server import protocol
from llamatrt.server.metrics import Metrics


class Guard:
    def __init__(
        self, app: Any, api_key: str | None, open_paths: frozenset[str], max_body: int, metrics: Metrics
    ) -> None:
        self.app, self.open_paths, self.max_body, self.metrics = app, open_paths, max_body, metrics
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, sending)
        else:
            await self.app(scope, receive, sending)
        route = scope.get("route")  # the route template, so made-up paths add no series
        self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()

    def _refusal(self, scope: dict[str, Any]) -> JSONResponse | None:
        headers = Headers(scope=scope)
        sent = headers.get("authorization", "").encode("utf-8", "surrogateescape")
        guarded = self.expected is not None and scope["path"] not in self.open_paths
        if guarded and not hmac.compare_digest(sent, self.expected or b""):
            return protocol.error_response(
                401,
                "missing or wrong API key; send `Authorization: Bearer KEY`",
                "authentication_error",
                code="invalid_api_key",
            )
        length = headers.get("content-length") or "0"
        if not length.isdigit():
            return protocol.error_response(400, "the Content-Length header is not a number; send a valid one")
        if int(length) > self.max_body:
            return protocol.error_response(413, f"the request body is over {self.max_body} bytes; send a smaller one")
        return None
