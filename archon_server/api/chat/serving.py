"""The logic behind POST /v1/chat/completions: resolve the model, run the graph, shape the answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from ...backends.base import StreamChunk, TokenLogprob, Usage
from ...backends.registry import BackendRegistry
from ...components import FinalOverrides
from ...graph.catalog import Catalog
from ...graph.runtime import GraphError, GraphRuntime, RunResult
from ...spec import ArchitectureSpec, SpecError, deep_merge, parse_architecture
from ..errors import APIError, error_body
from ..metrics import Metrics
from ..traces.store import TraceStore, entry
from .protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    DeltaMessage,
    ResponseMessage,
    StreamChoice,
    UsageInfo,
)

log = logging.getLogger("archon.api")


def _logprobs_json(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if not lps:
        return None
    return {
        "content": [
            {"token": t.token, "logprob": t.logprob, "bytes": None,
             "top_logprobs": [{"token": a, "logprob": b, "bytes": None} for a, b in t.top]}
            for t in lps
        ]
    }


def _usage(u: Usage) -> UsageInfo:
    return UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


# Architecture overrides in a request are untrusted input. They may not bring their own regular expressions: a
# catastrophic pattern runs on the event loop and stalls every request (`(a+)+$` on 30 characters takes minutes).
# Nor may they fan out without bound: every layer and call is upstream traffic the operator pays for.
MAX_OVERRIDE_LAYERS = 32
MAX_OVERRIDE_CALLS = 256


def _has_key(obj: Any, key: str, depth: int = 0) -> bool:
    if depth > 64:  # deeper than any architecture: treat as suspicious
        return True
    if isinstance(obj, dict):
        return key in obj or any(_has_key(v, key, depth + 1) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_key(v, key, depth + 1) for v in obj)
    return False


async def _disconnected(raw: Request) -> None:
    """Returns when the client has gone. The body is already read, so the ASGI server's next message is the
    disconnect (uvicorn sends it as soon as the socket closes); anything else, wait a little and ask again."""
    while (await raw.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.25)


class ChatService:
    def __init__(self, registry: BackendRegistry, catalog: Catalog, *, max_n: int, max_inflight: int,
                 request_timeout_s: float, metrics: Metrics, max_messages: int = 512, traces: TraceStore | None = None):
        self.registry = registry
        self.catalog = catalog
        self.runtime = GraphRuntime(registry)
        self.max_n = max_n
        self.max_inflight = max_inflight
        self.request_timeout_s = request_timeout_s
        self.max_messages = max_messages
        self.metrics = metrics
        self.traces = traces or TraceStore(0)
        self.inflight = 0
        self.admitted = 0  # requests admitted since start (the idle heap trim watches it)

    # -- resolution -------------------------------------------------------------
    def resolve(self, req: ChatCompletionRequest) -> ArchitectureSpec:
        spec = self.catalog.lookup(req.model)
        if spec is None:
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
        if req.architecture:
            if _has_key(req.architecture, "pattern"):
                raise APIError(400, "architecture override: regex extractors (`pattern`) are accepted in architecture files only",
                               param="architecture", code="invalid_value")
            merged = deep_merge(spec.model_dump(mode="json", exclude_none=True), req.architecture)
            try:
                spec = parse_architecture(merged)
            except SpecError as e:
                first = e.errors[0]
                raise APIError(400, "architecture override invalid: " + "; ".join(e.errors), param="architecture." + first.split(":")[0], code="invalid_value") from None
            calls = spec.backend_calls_estimate()
            if len(spec.layers) > MAX_OVERRIDE_LAYERS or calls > MAX_OVERRIDE_CALLS:
                raise APIError(400, f"architecture override too large: {len(spec.layers)} layers, up to {calls} backend calls per request "
                               f"(limits {MAX_OVERRIDE_LAYERS} and {MAX_OVERRIDE_CALLS})", param="architecture", code="invalid_value")
        missing = self.runtime.check_bindings(spec)
        if missing:
            raise APIError(400, f"architecture {spec.name!r} uses model alias(es) with no backend: {', '.join(missing)}", param="architecture", code="invalid_value")
        return spec

    def final_overrides(self, req: ChatCompletionRequest) -> FinalOverrides:
        if req.n > self.max_n:
            raise APIError(400, f"n: must be <= {self.max_n}", param="n", code="invalid_value")
        if len(req.messages) > self.max_messages:
            raise APIError(400, f"messages: at most {self.max_messages} messages", param="messages", code="invalid_value")
        return FinalOverrides(
            n=req.n, temperature=req.temperature, top_p=req.top_p,
            max_tokens=req.max_completion_tokens or req.max_tokens, stop=req.stop, seed=req.seed,
            logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0,
        )

    def _admit(self) -> None:
        """Take an in-flight slot or refuse at once (429); every admitted request calls :meth:`_release` once."""
        if self.inflight >= self.max_inflight:
            self.metrics.rejected.labels("concurrency").inc()
            raise APIError(429, f"server busy: {self.max_inflight} requests in flight; retry later", code="rate_limit_exceeded")
        self.admitted += 1
        self.inflight += 1
        self.metrics.inflight.inc()

    def _release(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.dec()

    def _gerr(self, e: GraphError) -> APIError:
        return APIError(e.status, str(e), code={502: "upstream_error", 504: "timeout", 400: "invalid_value"}.get(e.status))

    def _observe(self, model: str, status: int, t0: float, res: RunResult | None) -> None:
        self.metrics.requests.labels(model, str(status)).inc()
        self.metrics.latency.labels(model).observe(time.perf_counter() - t0)
        if res is not None:
            self.metrics.tokens.labels("prompt").inc(res.usage.prompt_tokens)
            self.metrics.tokens.labels("completion").inc(res.usage.completion_tokens)
            for layer in res.trace.layers:
                for c in layer.calls:
                    self.metrics.backend_calls.labels(c.model, "ok" if c.ok else "error").inc(c.requests)

    def _keep(self, cid: str, req: ChatCompletionRequest, status: int, res: RunResult | None, err: GraphError | None) -> None:
        """Remember a finished request for /v1/traces and the console (server.keep_traces)."""
        if not self.traces.enabled or (res is None and (err is None or err.trace is None)):
            return
        trace = res.trace if res is not None else err.trace  # type: ignore[union-attr]
        self.traces.add(entry(cid, req.model, [m.to_dict() for m in req.messages], status=status, stream=req.stream,
                              trace=trace.to_dict() if trace else None, answers=res.choices if res else None,
                              error=str(err) if err else None))

    # -- non-streaming ------------------------------------------------------------
    async def create(self, req: ChatCompletionRequest, raw: Request) -> dict[str, Any]:
        spec = self.resolve(req)
        final = self.final_overrides(req)
        self._admit()
        t0 = time.perf_counter()
        status, res, gerr, cid = 500, None, None, f"chatcmpl-{uuid.uuid4().hex}"
        try:
            task = asyncio.ensure_future(self.runtime.run(spec, [m.to_dict() for m in req.messages], final=final, deadline_s=self.request_timeout_s))
            # Starlette does not cancel a non-streaming handler when the client goes away: wait for the disconnect
            # itself rather than polling for it (4 polls a second per request cost real CPU at 1000 in flight).
            gone = asyncio.ensure_future(_disconnected(raw))
            try:
                await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not task.done():
                task.cancel()
                status = 499
                log.info("client disconnected; cancelled %s", spec.name)
                raise APIError(499, "client disconnected")
            try:
                res = task.result()
            except GraphError as e:
                status, gerr = e.status, e
                # Operators need the cause; upstream error text is already stripped of keys (backends/http.py).
                log.warning("%s failed (%d): %s", spec.name, e.status, e)
                raise self._gerr(e) from None
            status = 200
            return self._response(req, spec, res, cid).model_dump(exclude_none=True)
        finally:
            self._release()
            self._observe(spec.name, status, t0, res)
            self._keep(cid, req, status, res, gerr)

    def _response(self, req: ChatCompletionRequest, spec: ArchitectureSpec, res: RunResult, cid: str) -> ChatCompletionResponse:
        choices = [
            Choice(index=i, message=ResponseMessage(content=c.text), finish_reason=c.finish_reason or "stop",
                   logprobs=_logprobs_json(c.meta.get("logprobs")) if req.logprobs else None)
            for i, c in enumerate(res.candidates)
        ]
        return ChatCompletionResponse(
            id=cid, created=int(time.time()), model=req.model, choices=choices,
            usage=_usage(res.usage), trace=res.trace.to_dict() if req.return_trace else None,
        )

    # -- streaming ----------------------------------------------------------------
    async def create_stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        """Validate and admit first (errors become normal HTTP errors), then return the SSE generator."""
        spec = self.resolve(req)
        final = self.final_overrides(req)
        self._admit()
        return self._stream(req, spec, final)

    async def _stream(self, req: ChatCompletionRequest, spec: ArchitectureSpec, final: FinalOverrides) -> AsyncIterator[str]:
        cid, created, t0 = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), time.perf_counter()
        # Backend tokens, and with `stream_trace` the trace's events (dicts) as they happen; None: the graph ended.
        queue: asyncio.Queue[StreamChunk | dict[str, Any] | None] = asyncio.Queue()

        async def sink(ch: StreamChunk) -> None:
            await queue.put(ch)

        def chunk(choices: list[StreamChoice], **kw: Any) -> str:
            c = ChatCompletionChunk(id=cid, created=created, model=req.model, choices=choices, **kw)
            return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

        task = asyncio.ensure_future(self.runtime.run(spec, [m.to_dict() for m in req.messages], final=final, sink=sink, deadline_s=self.request_timeout_s,
                                                      observer=queue.put_nowait if req.stream_trace else None))
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        status, res, gerr = 500, None, None
        finished: set[int] = set()
        try:
            for i in range(final.n):
                yield chunk([StreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, dict):  # a trace event: a chunk with no choices, ignored by OpenAI clients
                    yield chunk([], trace_event=item)
                elif item.text:
                    yield chunk([StreamChoice(index=item.index, delta=DeltaMessage(content=item.text))])
            try:
                res = task.result()
            except GraphError as e:
                status, gerr = e.status, e
                log.warning("%s stream failed (%d): %s", spec.name, e.status, e)
                yield f"data: {json.dumps(error_body(e.status, str(e), code='upstream_error' if e.status == 502 else 'timeout'))}\n\n"
                yield "data: [DONE]\n\n"
                return
            status = 200
            if not res.streamed:  # the final stage was not streamable (ranker, vote, several components...)
                for i, c in enumerate(res.candidates):
                    yield chunk([StreamChoice(index=i, delta=DeltaMessage(content=c.text))])
            for i, c in enumerate(res.candidates):
                finished.add(i)
                yield chunk([StreamChoice(index=i, delta=DeltaMessage(), finish_reason=c.finish_reason or "stop")])
            if req.stream_options and req.stream_options.include_usage or req.return_trace:
                yield chunk(
                    [],
                    usage=_usage(res.usage) if (req.stream_options and req.stream_options.include_usage) else None,
                    trace=res.trace.to_dict() if req.return_trace else None,
                )
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():  # client went away: cancel every in-flight backend call
                task.cancel()
                status = 499
            self._release()
            self._observe(spec.name, status, t0, res)
            self._keep(cid, req, status, res, gerr)
