"""The HTTP routes: POST /v1/chat/completions (JSON or SSE), GET /v1/models, GET /health.

Every error, ours or the framework's (unknown route, wrong method), leaves as an OpenAI error body.
With an API key set, every route but /health needs `Authorization: Bearer <key>`; /health stays open so
load balancers and probes can reach it. Parsing, chat templating and tokenization run on a thread, so
a long prompt never stalls the event loop that streams everyone else's tokens.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ray_zephyr.serving.metrics import CountStatus
from ray_zephyr.serving.protocol import OpenAIError, parse_request
from ray_zephyr.serving.service import ChatService, TokenizedRequest

logger = logging.getLogger(__name__)


def _error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _authorized(request: Request, api_key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


async def _sse(service: ChatService, tokenized: TokenizedRequest) -> AsyncIterator[str]:
    try:
        async for chunk in service.stream(tokenized):
            yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
    except Exception as exc:  # noqa: BLE001 - headers are sent: the error can only travel as an event
        logger.exception("generation failed mid-stream (request %s)", tokenized.id)
        error = exc if isinstance(exc, OpenAIError) else OpenAIError(500, "generation failed", type="server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
        return
    yield "data: [DONE]\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed `limit` bytes (declared or streamed)."""
    too_large = OpenAIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


class RequireKey:
    """ASGI middleware: 401 for a request without the API key, on every route but the health probe (wherever
    Serve mounts the app: route_prefix, root_path). Plain ASGI rather than `@app.middleware("http")`, whose
    BaseHTTPMiddleware runs every request through an extra task and memory stream (about 5% of a busy
    replica's CPU in a py-spy profile); without a key there is no middleware at all."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            if not request.url.path.rstrip("/").endswith("/health") and not _authorized(request, self.api_key):
                response = _error_response(OpenAIError(
                    401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_api(service: ChatService, api_key: str | None = None, max_request_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="ray-zephyr chat", docs_url=None, redoc_url=None)
    if api_key:
        app.add_middleware(RequireKey, api_key=api_key)
    if service.metrics:
        app.add_middleware(CountStatus, metrics=service.metrics)  # added last: outermost, so it sees 401s too

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error_response(OpenAIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed", exc_info=exc)
        return _error_response(OpenAIError(500, "internal server error", type="server_error"))

    @app.get("/health")
    async def health() -> dict:
        await service.engine.check_health()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return service.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _read_body(request, max_request_bytes)
        tokenized = await asyncio.to_thread(lambda: service.tokenize_request(parse_request(body)))
        if tokenized.request.stream:
            return StreamingResponse(_sse(service, tokenized), media_type="text/event-stream")
        completion = await service.complete(tokenized)
        return Response(completion.model_dump_json(exclude_unset=True), media_type="application/json")

    return app
