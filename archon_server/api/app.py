"""The FastAPI application: routes, error handlers, the edge middleware (api/edge.py), lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..backends.registry import BackendRegistry, build_registry
from ..config import ServerConfig
from ..graph.catalog import Catalog
from ..spec import ArchitectureSpec, SpecError
from .architectures.api_router import router as architectures_router
from .auth import load_keys
from .chat.api_router import router as chat_router
from .chat.serving import ChatService
from .completions.api_router import router as completions_router
from .completions.serving import CompletionsService
from .edge import BodyBudget, GuardMiddleware, redact_access_log
from .embeddings.api_router import router as embeddings_router
from .errors import (
    APIError,
    api_error_handler,
    http_error_handler,
    unhandled_handler,
    validation_handler,
)
from .memory import trim_when_idle
from .metrics import Metrics
from .models.api_router import router as models_router
from .responses.api_router import router as responses_router
from .responses.serving import ResponsesService
from .traces.api_router import router as traces_router
from .traces.peers import TracePeers
from .traces.store import TraceStore
from .ui.api_router import is_public, mount_ui

log = logging.getLogger("archon.api")

PUBLIC_PATHS = frozenset({"/health"})
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/responses", "/v1/completions"})  # admitted by ChatService


class StartupGate:
    """Requests wait until the backends have started (``/health`` and ``/metrics`` answer at once); after a
    failed start they go on and meet the backend's own error."""

    def __init__(self, app: ASGIApp, ready: Callable[[], asyncio.Future[Any] | None], open_paths: frozenset[str]):
        self.app, self.ready, self.open_paths = app, ready, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ready = self.ready()
        if scope["type"] == "http" and ready is not None and not ready.done() and scope["path"] not in self.open_paths:
            with contextlib.suppress(Exception):
                await asyncio.shield(ready)
        await self.app(scope, receive, send)


def add_routes_first(app: FastAPI, routers: list[APIRouter]) -> None:
    """The endpoint folders' routes go into the app's own route list, ahead of the documentation routes FastAPI
    puts first, instead of ``app.include_router``: FastAPI 0.165 keeps an included router nested and works out again
    on every request which of its routes apply (a walk over its routes for their version, a context variable, scope
    bookkeeping). That, and matching the four documentation routes first, was ~70K of the ~1.5M instructions a
    self-moa request costs in the app (issue 20; counted under valgrind). Include-time settings are what nesting
    would combine, so a router with a prefix, dependencies or tags is refused here rather than served without them."""
    routes = []
    for router in routers:
        if router.prefix or router.dependencies or router.tags:
            raise ValueError(f"add_routes_first: a router with a prefix, dependencies or tags needs include_router ({router.routes})")
        routes.extend(router.routes)
    app.router.routes[0:0] = routes


def native_telemetry() -> dict[str, Any]:
    """FastAPI's native OpenTelemetry, on when OpenTelemetry is set up at start: an ``OTEL_*`` or
    ``FASTAPI_OTEL_*`` variable is set, or the OpenTelemetry SDK is already loaded (as ``opentelemetry-instrument``
    loads it). Otherwise off: with it on, FastAPI asks the global providers on every request whether someone
    configured them since (~3 us of each request's CPU), and in ``archon serve`` nothing configures them later. A
    program that builds the app itself and sets providers afterwards sets an ``OTEL_...`` variable."""
    if any(k.startswith(("OTEL_", "FASTAPI_OTEL_")) for k in os.environ) or "opentelemetry.sdk" in sys.modules:
        return {}  # FastAPI's defaults
    return {"tracing": False, "metrics": False, "logs": False}


def counted(handler: Callable[[Request, Any], Awaitable[Response]], metrics: Metrics) -> Callable[[Request, Any], Awaitable[Response]]:
    """An error handler that counts a generation request it answers in ``archon_requests_total`` by status: one
    refused before it ran (a 400 on a field, an unknown model: 404, a 504 before admission) was counted nowhere. A
    request that ran was counted as it ended (``APIError.observed``)."""
    async def handle(request: Request, exc: Any) -> Response:
        response = await handler(request, exc)
        if request.url.path in GENERATION_PATHS and not getattr(exc, "observed", False):
            metrics.refused(response.status_code)
        return response

    return handle


def check_default(name: str | None, catalog: Catalog) -> None:
    """``server.default_architecture`` must name something this config serves: else every request without ``model``
    was a 404 naming a model the client never sent. A config error (SpecError: ``archon serve`` says it, exits 2)."""
    if name is None:
        return
    unbound = catalog.unbound()
    if catalog.lookup(name) is None or name in unbound:
        why = (f"its aliases have no backend ({', '.join(unbound[name])})" if name in unbound
               else "it is not an architecture or backend alias of this config")
        served = [n for n in catalog.names() if n not in unbound]
        raise SpecError([f"server.default_architecture: {name!r} cannot be served: {why} "
                         f"(served: {', '.join(served) or 'none'}; or a backend alias)"])


def build_app(
    config: ServerConfig, registry: BackendRegistry | None = None, catalog: Catalog | Mapping[str, ArchitectureSpec] | None = None,
    trace_peers: str | None = None,
) -> FastAPI:
    """``catalog``: default, the config's architecture folders; a mapping is a fixed set of architectures.
    ``trace_peers``: with ``--workers N``, the directory where the workers answer each other for their traces."""
    registry = registry or build_registry(config)
    if catalog is None:
        catalog = Catalog(config.architectures_dirs, registry)
    elif not isinstance(catalog, Catalog):
        catalog = Catalog(registry=registry, specs=catalog)
    metrics = Metrics(registry.backends)
    s = config.server
    check_default(s.default_architecture, catalog)

    def on_ready(task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("a backend failed to start (GET /health says which): %s", task.exception())
        else:
            unbound = catalog.unbound()
            if unbound:  # a preset folder serves every file in it: say which cannot run on this config's backends
                log.warning("not served (aliases with no backend): %s",
                            "; ".join(f"{n} ({', '.join(m)})" for n, m in unbound.items()))
            log.info("ready: serving %d architecture(s) and %d backend alias(es)", len(catalog) - len(unbound), len(registry.aliases()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        redact_access_log()  # after the server configured logging, so the filter sits on its access logger
        # The port is bound before the backends are up: loading (on a first start, converting) a local model
        # takes seconds, and meanwhile /health answers 503 with the reason instead of refusing connections.
        starting = app.state.starting = {alias: asyncio.ensure_future(b.start()) for alias, b in registry.backends().items()}
        ready = app.state.ready = asyncio.ensure_future(asyncio.gather(*starting.values()))
        ready.add_done_callback(on_ready)
        chat: ChatService = app.state.chat
        for name, spec in catalog.architectures.items():  # scorers on backends that cannot score: said now
            for problem in await chat.runtime.scoring_problems(spec, probe=False):
                log.warning("architecture %r will refuse requests: its scorer needs what %s", name, problem)
        trimmer = asyncio.ensure_future(trim_when_idle(lambda: chat.admitted, lambda: chat.inflight))
        peers: TracePeers | None = app.state.trace_peers
        if peers is not None:
            await peers.start()
        try:
            yield
        finally:
            if peers is not None:
                await peers.close()
            trimmer.cancel()
            ready.cancel()
            await registry.close()

    app = FastAPI(title="archon-server", version="0.1.0", lifespan=lifespan, telemetry=native_telemetry())
    app.state.registry = registry
    app.state.catalog = catalog  # every endpoint resolves model names here
    app.state.config = config
    app.state.metrics = metrics
    app.state.chat = ChatService(
        registry, catalog, max_n=s.max_n, max_inflight=s.max_concurrent_requests,
        request_timeout_s=s.request_timeout_s, metrics=metrics, max_messages=s.max_messages,
        traces=TraceStore(s.keep_traces), default_model=s.default_architecture,
    )
    app.state.responses = ResponsesService(app.state.chat)
    app.state.completions = CompletionsService(app.state.chat)
    app.state.traces = app.state.chat.traces
    app.state.trace_peers = TracePeers(trace_peers, app.state.traces) if trace_peers else None
    app.add_exception_handler(APIError, counted(api_error_handler, metrics))  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, counted(validation_handler, metrics))  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, counted(http_error_handler, metrics))  # type: ignore[arg-type]
    app.add_exception_handler(Exception, counted(unhandled_handler, metrics))
    add_routes_first(app, [chat_router, completions_router, responses_router, models_router, embeddings_router,
                           traces_router, architectures_router])
    mount_ui(app)

    @app.get("/health", responses={503: {"description": "starting (the reason says what it waits for) or a backend failed to start"}})
    async def health() -> Any:
        starting: dict[str, asyncio.Future[None]] = getattr(app.state, "starting", {})
        waiting = {a: t for a, t in starting.items() if not t.done() or t.cancelled() or t.exception() is not None}
        if not waiting:
            return {"status": "ok"}
        failed = {a: t for a, t in waiting.items() if t.done()}
        if failed:
            reason = "; ".join(f"backend {a} failed to start: {t.exception() if not t.cancelled() else 'cancelled'}" for a, t in failed.items())
            return JSONResponse({"status": "error", "reason": reason}, status_code=503)
        reason = "; ".join(f"backend {a}: {registry.backends()[a].start_status}" for a in waiting)
        return JSONResponse({"status": "starting", "reason": reason}, status_code=503)

    # Documented as text/plain (Prometheus' exposition format), so schema-driven clients and fuzzers agree with it.
    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prom(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    chat: ChatService = app.state.chat

    def busy() -> bool:
        return chat.inflight >= chat.max_inflight

    app.add_middleware(StartupGate, ready=lambda: getattr(app.state, "ready", None), open_paths=PUBLIC_PATHS | {"/metrics"})
    app.add_middleware(GuardMiddleware, keys=load_keys(s), max_body=s.max_body_bytes, busy=busy, busy_paths=GENERATION_PATHS,
                       public=lambda path: path in PUBLIC_PATHS or is_public(path), budget=BodyBudget(s.max_inflight_body_bytes),
                       on_reject=lambda path, status, reason: metrics.refused(status, reason, generation=path in GENERATION_PATHS))
    return app


__all__ = ["JSONResponse", "build_app"]
