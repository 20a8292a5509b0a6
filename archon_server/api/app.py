"""The FastAPI application: routes, error handlers, body-size limit, auth, lifespan."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..backends.registry import BackendRegistry, build_registry
from ..config import ServerConfig
from ..graph.catalog import Catalog
from ..spec import ArchitectureSpec
from .architectures.api_router import router as architectures_router
from .auth import check_key, load_keys
from .chat.api_router import router as chat_router
from .chat.serving import ChatService
from .errors import APIError, api_error_handler, error_body, http_error_handler, unhandled_handler, validation_handler
from .memory import trim_when_idle
from .metrics import Metrics
from .models.api_router import router as models_router
from .traces.api_router import router as traces_router
from .traces.store import TraceStore
from .ui.api_router import is_public, mount_ui

log = logging.getLogger("archon.api")

PUBLIC_PATHS = frozenset({"/health"})


async def _send_error(send: Send, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Auth and body-size limit as plain ASGI, so they run before any body is parsed (and for every route)."""

    def __init__(self, app: ASGIApp, keys: list[bytes], max_body: int, busy: Callable[[], bool] | None = None):
        self.app = app
        self.keys = keys
        self.max_body = max_body
        self.busy = busy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.keys and path not in PUBLIC_PATHS and not is_public(path) and not check_key(headers.get("authorization"), self.keys):
            await _send_error(send, 401, "Incorrect or missing API key (Authorization: Bearer <key>).", "invalid_api_key")
            return
        if self.busy is not None and scope.get("method") == "POST" and scope.get("path") == "/v1/chat/completions" and self.busy():
            # Refuse before reading or parsing the body: under overload a 429 must cost next to nothing, or the
            # rejected clients' retries eat the CPU the admitted requests need (ChatService re-checks on admission).
            await _send_error(send, 429, "server busy: too many requests in flight; retry later", "rate_limit_exceeded")
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _send_error(send, 413, f"request body larger than {self.max_body} bytes", "request_too_large")
            return
        seen = 0
        started = False  # the app began its response
        refused = False  # we answered 413 ourselves

        async def limited_receive() -> Message:
            nonlocal seen, refused
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    # Answer 413 right here: raising would not do, since FastAPI turns any failure while reading
                    # the body into a 400. The app is then told the client left, and whatever it sends is dropped.
                    if not started and not refused:
                        refused = True
                        await _send_error(send, 413, f"request body larger than {self.max_body} bytes", "request_too_large")
                    return {"type": "http.disconnect"}
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if refused:
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not refused:  # an error after our 413 is the app noticing the "disconnect": nothing more to say
                raise


def build_app(
    config: ServerConfig, registry: BackendRegistry | None = None, catalog: Catalog | Mapping[str, ArchitectureSpec] | None = None
) -> FastAPI:
    """``catalog``: default, the config's architecture folders; a mapping is a fixed set of architectures."""
    registry = registry or build_registry(config)
    if catalog is None:
        catalog = Catalog(config.architectures_dirs, registry)
    elif not isinstance(catalog, Catalog):
        catalog = Catalog(registry=registry, specs=catalog)
    metrics = Metrics()
    s = config.server

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        await registry.start()
        log.info("serving %d architecture(s) and %d backend alias(es)", len(catalog), len(registry.aliases()))
        chat: ChatService = app.state.chat
        for name, spec in catalog.architectures.items():  # scorers on backends that cannot score: said now
            for problem in await chat.runtime.scoring_problems(spec, probe=False):
                log.warning("architecture %r will refuse requests: its scorer needs what %s", name, problem)
        trimmer = asyncio.ensure_future(trim_when_idle(lambda: chat.admitted, lambda: chat.inflight))
        try:
            yield
        finally:
            trimmer.cancel()
            await registry.close()

    app = FastAPI(title="archon-server", version="0.1.0", lifespan=lifespan)
    app.state.registry = registry
    app.state.catalog = catalog  # every endpoint resolves model names here
    app.state.config = config
    app.state.metrics = metrics
    app.state.chat = ChatService(
        registry, catalog, max_n=s.max_n, max_inflight=s.max_concurrent_requests,
        request_timeout_s=s.request_timeout_s, metrics=metrics, max_messages=s.max_messages,
        traces=TraceStore(s.keep_traces),
    )
    app.state.traces = app.state.chat.traces
    app.add_exception_handler(APIError, api_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unhandled_handler)
    app.include_router(chat_router)
    app.include_router(models_router)
    app.include_router(traces_router)
    app.include_router(architectures_router)
    mount_ui(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    # Documented as text/plain (Prometheus' exposition format), so schema-driven clients and fuzzers agree with it.
    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prom(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    chat: ChatService = app.state.chat

    def busy() -> bool:
        if chat.inflight >= chat.max_inflight:
            metrics.rejected.labels("concurrency").inc()
            return True
        return False

    app.add_middleware(GuardMiddleware, keys=load_keys(s), max_body=s.max_body_bytes, busy=busy)
    return app


__all__ = ["build_app", "JSONResponse"]
