"""The logic behind POST /v1/chat/completions: resolve the model, run the graph, shape the answer."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson
from fastapi import Request

from ...backends.base import REFUSE_OVERFLOW, SAMPLING_EXTRAS, StreamChunk, Usage
from ...backends.registry import BackendRegistry
from ...components import COMPONENTS, FinalOverrides, prompts
from ...components.base import StreamSink
from ...components.generator import with_note
from ...components.state import Candidate
from ...components.trace import TraceObserver
from ...graph.catalog import Catalog, is_passthrough
from ...components.trace import Trace
from ...graph.runtime import GraphError, GraphRuntime, RunResult, answer_writer, streams_final
from ...spec import ArchitectureSpec, SpecError, deep_merge, parse_architecture
from ..edge import deadline_s, remaining_s
from ..errors import CHAT_FIELDS, APIError, PromptFields, failure, failure_code, sse_error
from ..ids import new_id
from ..logprobs import chat_logprobs
from ..metrics import Metrics
from ..streaming import EventStream, data_event, shutdown_error
from ..structured import STRUCTURED_RETRIES, StructuredOutputInvalid, conform_all
from ..traces.store import TraceStore, entry
from .protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    DeltaMessage,
    StreamChoice,
    UsageInfo,
)

log = logging.getLogger("archon.api")


_logprobs_json = chat_logprobs  # a choice's or a streamed chunk's logprobs, bytes filled (api/logprobs.py)


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


class _Hangup:
    """The disconnect watcher's done-callback: cancels the request's task when the client went away (the watcher
    returned), once; after the request ended (``task`` None), or when the watcher was cancelled, it does nothing."""

    __slots__ = ("task", "fired")

    def __init__(self, task: asyncio.Task[Any] | None):
        self.task = task
        self.fired = False

    def __call__(self, gone: asyncio.Future[None]) -> None:
        if self.task is not None and not gone.cancelled() and gone.exception() is None:
            self.fired = True
            self.task.cancel()


class _TraceSlot:
    """The trace of the request's graph run, kept by :meth:`ChatService.run_graph` as the run starts: a run that ends
    without a result (a 422 answer, a client gone, the server shutting down) is still in /v1/traces with what it did."""

    __slots__ = ("trace",)

    def __init__(self) -> None:
        self.trace: Trace | None = None

    def __call__(self, trace: Trace) -> None:
        self.trace = trace

    def error(self, status: int, err: GraphError | StructuredOutputInvalid | None, why: str) -> GraphError | None:
        """What :data:`Keep` gets as the error: the graph's own, or one carrying this trace."""
        if isinstance(err, GraphError) or self.trace is None:
            return err if isinstance(err, GraphError) else None
        return GraphError(str(err) if err is not None else why, status=status, trace=self.trace)


# Set around a request's run (execute, open_stream); a stream's run task copies it as it is created.
_SLOT: contextvars.ContextVar[_TraceSlot | None] = contextvars.ContextVar("archon_trace_slot", default=None)


class _Keepalive:
    """Puts :data:`KEEPALIVE` on a stream's queue when nothing came for ``every`` seconds: one timer per stream,
    re-armed from the last item (``last``, set by the consumer), instead of a wait with a timeout per token.

    An object, not a closure: a closure that re-arms itself holds its own cell, a reference cycle per stream that
    only the cyclic collector frees (with the Queue, its deques and futures behind it)."""

    def __init__(self, queue: asyncio.Queue[Any], every: float):
        self.queue = queue
        self.every = every
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()  # when the consumer last got something (keep-alives count)
        self.timer: asyncio.TimerHandle | None = self.loop.call_at(self.last + every, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        if now - self.last >= self.every * 0.999 and self.queue.empty():
            self.queue.put_nowait(KEEPALIVE)
            self.last = now
        self.timer = self.loop.call_at(self.last + self.every, self._tick)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()  # drops the handle's reference back to this object
            self.timer = None


class ChatService:
    def __init__(self, registry: BackendRegistry, catalog: Catalog, *, max_n: int, max_inflight: int,
                 request_timeout_s: float, metrics: Metrics, max_messages: int = 512, traces: TraceStore | None = None,
                 default_model: str | None = None):
        self.registry = registry
        self.catalog = catalog
        self.runtime = GraphRuntime(registry)
        self.max_n = max_n
        self.max_inflight = max_inflight
        self.request_timeout_s = request_timeout_s
        self.max_messages = max_messages
        self.keepalive_s = 5.0  # an SSE comment this often while a stream has nothing to say (inner layers running)
        # How long a stream's start waits for its first token, so that a refusal before it (a prompt past the context,
        # which the engine and vLLM say as they take the request) is a plain HTTP error as the non-streamed answer's.
        # A direct request (a backend alias): its first event is that refusal or its first token, which the role chunk
        # then goes out with (vLLM, too, sends its role chunk with the first output); no content waits for the hold.
        # An architecture: its first calls are refused as fast, but its inner layers run for seconds and the role
        # chunk says at once that the server works (issue #14), so it waits less.
        self.stream_hold_s = 2.0
        self.arch_stream_hold_s = 0.5
        self.metrics = metrics
        self.traces = traces or TraceStore(0)
        self.default_model = default_model  # server.default_architecture: a request without `model` (as vLLM allows)
        self.inflight = 0
        self.admitted = 0  # requests admitted since start (the idle heap trim watches it)

    # -- resolution -------------------------------------------------------------
    def resolve(self, req: ChatCompletionRequest) -> ArchitectureSpec:
        if req.model is None:
            if self.default_model is None:
                raise APIError(400, "model: required (this server has no server.default_architecture)", param="model", code="invalid_value")
            req.model = self.default_model  # the answer names what served it
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
            extra=final_extra(req.response_format, req.tools, req.tool_choice, req.parallel_tool_calls,
                              {**req.sampling_extra(), **req.template_extra()}),
        )

    def refuse_overflow(self, spec: ArchitectureSpec, final: FinalOverrides) -> FinalOverrides:
        """A request sent straight to a backend alias with an explicit max_tokens that, with the prompt, cannot fit the
        model's context is a 400 with OpenAI's (and older vLLM's) message, not an answer cut at the context's end:
        ``final`` flagged for a backend that honours the flag (the embedded engine, which raises ContextOverflow; an
        upstream answers as it does: vLLM 0.32 cuts it too, refusing only a max_tokens past the whole context).
        Architectures keep the cut: their inner calls rely on it."""
        if final.max_tokens is None or not is_passthrough(spec) or not self.registry.get(spec.name).refuses_overflow:
            return final
        return replace(final, extra={**final.extra, REFUSE_OVERFLOW: True})

    def check_final(self, spec: ArchitectureSpec, final: FinalOverrides, format_param: str = "response_format") -> None:
        """Tools need a final stage that produces the answer, on backends that can call tools: else 400 naming them
        (unless ``tool_choice`` is ``"none"``: no call is asked for, the answer is text).
        Sampling extras need final-stage backends that honour them (checked before any call runs), and min_tokens
        a max_tokens at least as large (vLLM's rule; against an architecture's own max_tokens the engine clamps it).
        A structured output's schema that a writer's backend cannot constrain its decoding to is a 400 naming
        ``format_param`` (the endpoint's field: Responses' ``text.format``), before the samples are paid for."""
        least = final.extra.get("min_tokens")
        if least and final.max_tokens is not None and least > final.max_tokens:
            raise APIError(400, f"min_tokens ({least}) must not exceed max_tokens ({final.max_tokens})",
                           param="min_tokens", code="invalid_value")
        writer = answer_writer(spec)
        given = final
        if writer is not None and writer != len(spec.layers) - 1:
            self.check_selected_n(spec, final.n)
            given = final.for_writers()  # what of it reaches the writers a selector picks from
        if given.extra and writer is not None:
            for comp in spec.layers[writer]:
                if COMPONENTS[comp.type].produces:  # the writers; judges (and a critic beside them) sample their own way
                    # a generator's every model writes; a fuser or sequential aggregator writes with its `model` (the
                    # latter's proposer samples its own way)
                    for alias in comp.models_used() if comp.type == "generator" else [comp.model]:
                        self.check_sampling(alias, given.extra, f"the final stage of {spec.name!r}")
                        self.check_format(alias, given.extra.get("response_format"), format_param)
        if not final.extra.get("tools") or final.extra.get("tool_choice") == "none":
            return  # tool_choice "none": the client asks for text, which any final stage writes (the tools are ignored)
        for comp in spec.layers[-1]:
            if comp.type not in ("generator", "fuser"):
                raise APIError(400, f"tools: the final stage of {spec.name!r} is a {comp.type}, which selects an answer "
                               "rather than writing one, so it cannot call tools", param="tools", code="invalid_value")
            for alias in comp.models_used():
                if not self.registry.get(alias).supports_tools:
                    raise APIError(400, f"tools: model {alias!r} (the final stage of {spec.name!r}) cannot call tools",
                                   param="tools", code="invalid_value")

    @staticmethod
    def check_selected_n(spec: ArchitectureSpec, n: int) -> None:
        """A final stage that selects returns at most the answers it keeps: asking for more is a 400 before any call
        (it had returned fewer choices, and a stream had announced choices it never finished)."""
        most = spec.answers_bound()
        if n > most:
            last = spec.layers[-1]
            what = ", ".join(c.type + (f" (top_k {c.top_k})" if getattr(c, "top_k", None) else "") for c in last)
            raise APIError(400, f"n: the final stage of {spec.name!r} ({what}) selects from the answers before it and "
                           f"returns at most {most}; ask for n <= {most}", param="n", code="invalid_value")

    def check_format(self, alias: str, response_format: dict[str, Any] | None, param: str) -> None:
        """A 400 when ``alias``'s backend says it cannot constrain its decoding to ``response_format`` (the embedded
        engine: a schema llguidance does not compile). Backends that cannot tell (an upstream decides itself) pass."""
        if not response_format:
            return
        try:
            self.registry.get(alias).check_response_format(response_format)
        except ValueError as e:
            raise APIError(400, f"{param}: model {alias!r} cannot constrain its output to this schema: {e}",
                           param=param, code="invalid_value") from None

    def check_sampling(self, alias: str, extra: dict[str, Any], where: str) -> None:
        """A 400 naming the first of the client's SAMPLING_EXTRAS in ``extra`` that ``alias``'s backend does not honour."""
        honoured = self.registry.get(alias).sampling_extras
        if honoured is None:
            return
        for name in SAMPLING_EXTRAS:
            if name in extra and name not in honoured:
                raise APIError(400, f"{name}: model {alias!r} ({where}) does not support it; it supports "
                               f"{', '.join(k for k in SAMPLING_EXTRAS if k in honoured) or 'none of them'}",
                               param=name, code="invalid_value")

    def _admit(self) -> None:
        """Take an in-flight slot or refuse at once (429); every admitted request calls :meth:`_release` once."""
        if self.inflight >= self.max_inflight:  # counted here (the edge's check let it in), not by the error handler
            self.metrics.refused(429, "concurrency")
            raise _observed(APIError(429, f"server busy: {self.max_inflight} requests in flight; retry later", code="rate_limit_exceeded"))
        self.admitted += 1
        self.inflight += 1
        self.metrics.inflight.inc()

    def _release(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.dec()

    def _gerr(self, e: GraphError | StructuredOutputInvalid, fields: PromptFields = CHAT_FIELDS) -> APIError:
        """The run's failure as the endpoint's error (``fields``: how it names the prompt and its max_tokens)."""
        if isinstance(e, StructuredOutputInvalid):
            return APIError(422, f"response_format: {e}", param="response_format", code="invalid_structured_output")
        return failure(e.status, str(e), fields)

    def _observe(self, model: str, status: int, t0: float, res: RunResult | None) -> None:
        if res is None:
            self.metrics.request_done(model, status, time.perf_counter() - t0)
            return
        self.metrics.request_done(model, status, time.perf_counter() - t0, res.usage.prompt_tokens, res.usage.completion_tokens)
        for layer in res.trace.layers:
            for c in layer.calls:
                self.metrics.backend_call(c.model, c.ok, c.requests)

    def _keep(self, cid: str, model: str, messages: list[dict[str, Any]], stream: bool, status: int, res: RunResult | None,
              err: GraphError | None) -> None:
        """Remember a finished request for /v1/traces and the console (server.keep_traces)."""
        if not self.traces.enabled or (res is None and (err is None or err.trace is None)):
            return
        trace = res.trace if res is not None else err.trace  # type: ignore[union-attr]
        self.traces.add(entry(cid, model, messages, status=status, stream=stream,
                              trace=trace, answers=res.choices if res else None,
                              error=str(err) if err else None))

    # -- the one run path (chat, responses and completions all come through here) ---------------
    async def run_graph(self, spec: ArchitectureSpec, messages: list[dict[str, Any]], final: FinalOverrides,
                        sink: StreamSink | None = None, observer: TraceObserver | None = None) -> RunResult:
        """Run the architecture; an answer that is not the JSON `response_format` asked for is asked for again, then
        refused (StructuredOutputInvalid). Streamed answers cannot be taken back: they are checked, not retried."""
        fmt = final.extra.get("response_format")
        if spec.tools_in_prompt and final.extra.get("tools"):
            messages = with_note(messages, prompts.tools_note(final.extra["tools"]))
        slot = _SLOT.get()
        for attempt in range(STRUCTURED_RETRIES + 1):
            res = await self.runtime.run(spec, messages, final=final, sink=sink, deadline_s=deadline_s(self.request_timeout_s),
                                         deadline_label=self.request_timeout_s, observer=observer, on_trace=slot)  # one deadline for all attempts, from arrival
            try:
                conform_all(res.candidates, fmt)
                return res
            except StructuredOutputInvalid as e:
                if sink is not None or attempt == STRUCTURED_RETRIES:
                    raise StructuredOutputInvalid(f"{spec.name}: {e}") from None
                log.info("%s: answer not as response_format asks (%s); running again", spec.name, e)
                if final.seed is not None:
                    final = replace(final, seed=final.seed + 1)
        raise AssertionError("unreachable")

    def _time_left(self) -> float:
        """What is left of the request's deadline. It started when the request reached the edge (api/edge.py), so
        reading and parsing the body and building the prompt count too: a big body cannot stretch the answer past
        ``request_timeout_s``. Nothing left: 504 at once, before admission."""
        left = remaining_s(self.request_timeout_s)
        if left <= 0:
            raise APIError(504, f"deadline of {self.request_timeout_s:g}s exceeded before the request could start", code=failure_code(504))
        return left

    async def execute(self, name: str, run: Callable[[], Awaitable[RunResult]], raw: Request, keep: Keep | None = None,
                      fields: PromptFields = CHAT_FIELDS) -> RunResult:
        """Admit, run (cancelled when the client goes away), count, ``keep(status, result, error)``; failures become
        APIErrors (``fields``: the endpoint's names of the prompt and max_tokens, for a context-length refusal)."""
        self._time_left()
        self._admit()
        t0 = time.perf_counter()
        status, res = 500, None
        # Starlette does not cancel a non-streaming handler when the client goes away: a task waits for the
        # disconnect itself (4 polls a second per request cost real CPU at 1000 in flight) and cancels this one.
        # The graph runs in this task, not a task of its own raced against the watcher with asyncio.wait: that
        # task and the wait were ~12 us of a self-moa request's server CPU (issue 20).
        me = asyncio.current_task()
        hangup = _Hangup(me)
        gone = asyncio.ensure_future(_disconnected(raw))
        gone.add_done_callback(hangup)
        slot = _TraceSlot()
        token = _SLOT.set(slot)
        failure: GraphError | StructuredOutputInvalid | None = None
        try:
            try:
                res = await run()
            except asyncio.CancelledError:
                if me is not None:
                    me.uncancel()  # answered here: the task goes on (and a timeout around it reads its count right)
                if not hangup.fired:
                    # Cancelled from outside: the server is shutting down and the requests still running when its
                    # grace period ended (uvicorn's timeout_graceful_shutdown) are cancelled. Answered as a 503 in
                    # OpenAI's schema, which the SDKs retry, instead of uvicorn's plain-text 500 and a traceback each.
                    status = 503
                    log.warning("server shutting down: %s cancelled before it finished", name)
                    raise _observed(shutdown_error()) from None
                status = 499
                log.info("client disconnected; cancelled %s", name)
                raise _observed(APIError(499, "client disconnected")) from None
            except (GraphError, StructuredOutputInvalid) as e:
                err = self._gerr(e, fields)
                status, failure = err.status, e
                # Operators need the cause; upstream error text is already stripped of keys (backends/http.py).
                log.warning("%s failed (%d): %s", name, err.status, e)
                raise _observed(err) from None
            status = 200
            return res
        finally:
            _SLOT.reset(token)
            hangup.task = None  # done: a disconnect from now on cancels nothing
            gone.cancel()
            self._release()
            self._observe(name, status, t0, res)
            if keep is not None:
                keep(status, res, None if res is not None else slot.error(status, failure, _UNFINISHED.get(status, "failed")))

    async def open_stream(self, name: str, run: Callable[[StreamSink, TraceObserver | None], Awaitable[RunResult]], keep: Keep | None = None,
                          trace_events: bool = False, *, batched: bool = False, keepalive_s: float | None = None,
                          raw: Request | None = None, direct: bool = False, fields: PromptFields = CHAT_FIELDS) -> AsyncIterator[Any]:
        """Admit now (a refusal is a plain HTTP error), start the run, and hold the answer's start until its first token
        (or its end) for at most :meth:`hold_s` (``direct``: a request sent straight to a backend alias), or until the
        client (``raw``) leaves: a run refused with a 4xx before any token (a prompt past the
        context, known when the backend takes the request) is a plain HTTP error too (raised here, as the non-streamed
        answer's), not a 200 and an error event. Then: the final stage's chunks as they come (with ``trace_events``, the trace's
        events too, as dicts), and last the result, or the APIError it failed with. With ``keepalive_s``,
        :data:`KEEPALIVE` after every ``keepalive_s`` without an item. ``batched``: lists of every item ready at once
        instead of single items, so a consumer slower than the upstream writes them in one go (one socket write
        instead of one per token). Closing the iterator early (client gone) cancels the run."""
        self._time_left()
        self._admit()
        # The request's task: cancelled itself only by the server's shutdown (a client that leaves cancels the body's
        # task, or ends it by a failed send), so the stream's status tells the two apart (503 / 499).
        request_task = asyncio.current_task()
        t0 = time.perf_counter()
        hold_s = self.stream_hold_s if direct else self.arch_stream_hold_s
        # Backend tokens, and trace events (dicts) as they happen; None: the graph ended.
        queue: asyncio.Queue[Any] = asyncio.Queue()
        put = queue.put_nowait  # unbounded: never waits

        async def sink(ch: StreamChunk) -> None:
            put(ch)

        slot = _TraceSlot()
        token = _SLOT.set(slot)
        try:
            task = asyncio.ensure_future(run(sink, put if trace_events else None))  # its context holds the slot
        finally:
            _SLOT.reset(token)
        task.add_done_callback(lambda _t: put(None))
        try:
            held = await _hold(queue, hold_s, raw)
        except asyncio.CancelledError:  # the server's shutdown, while holding: answered as execute answers it
            task.cancel()
            self._release()
            self._observe(name, 503, t0, None)
            if request_task is not None:
                request_task.uncancel()
            raise _observed(shutdown_error()) from None
        if held == "gone":  # the client left while the answer's start was held: as execute answers it
            task.cancel()
            log.info("client disconnected; cancelled %s", name)
            self._release()
            self._observe(name, 499, t0, None)
            if keep is not None:
                keep(499, None, slot.error(499, None, _UNFINISHED[499]))
            raise _observed(APIError(499, "client disconnected"))
        e = task.exception() if held == "ended" and not task.cancelled() else None
        err = self._gerr(e, fields) if isinstance(e, (GraphError, StructuredOutputInvalid)) else None
        # A refusal of the request itself (4xx: the same request would meet it again) is the HTTP error the client's
        # SDK raises as it does for the non-streamed request; a failure of the run (5xx) ends the stream as before.
        if err is not None and 400 <= err.status < 499:
            log.warning("%s stream failed before its first token (%d): %s", name, err.status, e)
            self._release()
            self._observe(name, err.status, t0, None)
            if keep is not None:
                keep(err.status, None, slot.error(err.status, e, "failed"))  # type: ignore[arg-type]
            raise _observed(err)
        return self._events(name, task, queue, slot, keep, batched, keepalive_s, request_task, t0, fields)

    async def _events(self, name: str, task: asyncio.Future[RunResult], queue: asyncio.Queue[Any], slot: _TraceSlot, keep: Keep | None,
                      batched: bool, keepalive_s: float | None, request_task: asyncio.Task[Any] | None, t0: float,
                      fields: PromptFields) -> AsyncIterator[Any]:
        keepalive = _Keepalive(queue, keepalive_s) if keepalive_s else None
        status, res = 500, None
        failure: GraphError | StructuredOutputInvalid | None = None
        try:
            ended = False
            while not ended:
                item = await queue.get()
                if keepalive is not None:
                    keepalive.last = keepalive.loop.time()
                if item is None:
                    break
                if not batched:
                    yield item
                    continue
                items = [item]
                while not queue.empty():
                    nxt = queue.get_nowait()
                    if nxt is None:
                        ended = True
                        break
                    items.append(nxt)
                yield items
            if keepalive is not None:
                keepalive.cancel()
            try:
                res = task.result()
            except (GraphError, StructuredOutputInvalid) as e:
                err = self._gerr(e, fields)
                status, failure = err.status, e
                log.warning("%s stream failed (%d): %s", name, err.status, e)
                yield [err] if batched else err
                return
            status = 200
            yield [res] if batched else res
        finally:
            if keepalive is not None:
                keepalive.cancel()
            if not task.done():  # client went away (or the server shuts down): cancel every in-flight backend call
                task.cancel()
                status = 503 if request_task is not None and request_task.cancelling() else 499
            self._release()
            self._observe(name, status, t0, res)
            if keep is not None:
                keep(status, res, None if res is not None else slot.error(status, failure, _UNFINISHED.get(status, "failed")))

    # -- non-streaming ------------------------------------------------------------
    async def create(self, req: ChatCompletionRequest, raw: Request) -> dict[str, Any]:
        spec = self.resolve(req)
        final = self.refuse_overflow(spec, self.final_overrides(req))
        self.check_final(spec, final)
        messages = [m.to_dict() for m in req.messages]
        cid = new_id("chatcmpl-")
        res = await self.execute(spec.name, lambda: self.run_graph(spec, messages, final), raw,
                                 keep=lambda status, r, e: self._keep(cid, req.model, messages, False, status, r, e))
        return self._answer(req, res, cid)

    @staticmethod
    def _answer(req: ChatCompletionRequest, res: RunResult, cid: str) -> dict[str, Any]:
        """The chat.completion as ``ChatCompletionResponse(...).model_dump(exclude_none=True)`` gives it (but for
        ``content: null`` beside tool calls, which that dump left out), built as dicts: constructing and dumping the
        models was ~12 us of a self-moa request's ~550 us of server CPU (issue 20), with nothing to validate in what
        this code just made. The model stays the schema (OpenAPI); tests/test_chat_answer.py holds the two equal."""
        choices = []
        for i, c in enumerate(res.candidates):
            calls = c.meta.get("tool_calls")
            # content null beside tool calls, as OpenAI sends it (the model's dump without None fields dropped it)
            message: dict[str, Any] = {"role": "assistant", "content": c.text or (None if calls else "")}
            if calls is not None:
                message["tool_calls"] = calls
            choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish_reason(c)}
            if req.logprobs:
                lps = _logprobs_json(c.meta.get("logprobs"))
                if lps is not None:
                    choice["logprobs"] = lps
            choices.append(choice)
        u = res.usage
        out = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": req.model, "choices": choices,
               "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}}
        if req.return_trace:
            out["trace"] = res.trace.to_dict()
        return out

    # -- streaming ----------------------------------------------------------------
    async def create_stream(self, req: ChatCompletionRequest, raw: Request | None = None) -> EventStream:
        """Validate and admit first (errors become normal HTTP errors), then return the SSE generator."""
        spec = self.resolve(req)
        final = self.refuse_overflow(spec, self.final_overrides(req))
        self.check_final(spec, final)
        messages = [m.to_dict() for m in req.messages]
        cid = new_id("chatcmpl-")
        events = await self.open_stream(spec.name, lambda sink, observer: self.run_graph(spec, messages, final, sink, observer),
                                  keep=lambda status, r, e: self._keep(cid, req.model, messages, True, status, r, e),
                                  trace_events=req.stream_trace, batched=True, keepalive_s=self.keepalive_s,
                                  raw=raw, direct=is_passthrough(spec))
        return EventStream(sse_error).of(self._stream(req, final, cid, events, streams_final(spec)))

    async def _stream(self, req: ChatCompletionRequest, final: FinalOverrides, cid: str, events: AsyncIterator[list[Any]],
                      tokens: bool = True) -> AsyncIterator[str]:
        """The SSE body. ``events`` come in batches (everything ready at once): each batch is one write. A plain
        token is spliced into a chunk template made once per request (what pydantic writes for it, byte for byte)
        rather than built and serialised as a model per token. ``tokens``: the final stage streams its n choices; when
        it does not (a selector, several components), the choices past the first are announced with their answers,
        since a selector may keep fewer than n."""
        created = int(time.time())

        # With include_usage, OpenAI's every chunk but the usage one carries `"usage": null` (clients may read the key).
        null_usage = bool(req.stream_options and req.stream_options.include_usage)
        tail = '],"usage":null}' if null_usage else "]}"

        def chunk(choices: list[StreamChoice], **kw: Any) -> str:
            return data_event(ChatCompletionChunk(id=cid, created=created, model=req.model, choices=choices, **kw), null_usage)

        head = chunk([StreamChoice(index=0, delta=DeltaMessage(content="\0"))]).split('"index":0', 1)[0] + '"index":'

        def token(idx: int, text: str) -> str:
            return f'{head}{idx},"delta":{{"content":{json_str(text)}}}}}{tail}\n\n'

        async with contextlib.aclosing(events):
            def role(i: int) -> str:
                return chunk([StreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])

            yield "".join(role(i) for i in range(final.n if tokens else 1))
            async for batch in events:
                out: list[str] = []
                for item in batch:
                    if isinstance(item, StreamChunk):
                        if item.tool_calls:
                            out.append(chunk([StreamChoice(index=item.index, delta=DeltaMessage(content=item.text or None, tool_calls=item.tool_calls))]))
                        elif item.logprobs and req.logprobs:  # the piece's tokens' logprobs beside its text, as OpenAI sends them
                            out.append(chunk([StreamChoice(index=item.index, delta=DeltaMessage(content=item.text), logprobs=_logprobs_json(item.logprobs))]))
                        elif item.text:
                            out.append(token(item.index, item.text))
                    elif item is KEEPALIVE:  # SSE comment: clients and proxies see a live stream, OpenAI SDKs skip it
                        out.append(": keep-alive\n\n")
                    elif isinstance(item, APIError):
                        out.append(sse_error(item))
                        yield "".join(out)
                        return
                    elif isinstance(item, dict):  # a trace event: a chunk with no choices, ignored by OpenAI clients
                        out.append(chunk([], trace_event=item))
                    else:  # the result: the graph ended
                        res: RunResult = item
                        if not res.streamed:  # the final stage was not streamable (ranker, vote, several components...)
                            for i, c in enumerate(res.candidates):
                                if i and not tokens:
                                    out.append(role(i))
                                out.append(chunk([StreamChoice(index=i, delta=DeltaMessage(content=c.text or None, tool_calls=_indexed(c.meta.get("tool_calls"))),
                                                               logprobs=_logprobs_json(c.meta.get("logprobs")) if req.logprobs else None)]))
                        for i, c in enumerate(res.candidates):
                            out.append(chunk([StreamChoice(index=i, delta=DeltaMessage(), finish_reason=finish_reason(c))]))
                        if req.stream_options and req.stream_options.include_usage or req.return_trace:
                            out.append(chunk(
                                [],
                                usage=_usage(res.usage) if (req.stream_options and req.stream_options.include_usage) else None,
                                trace=res.trace.to_dict() if req.return_trace else None,
                            ))
                        out.append("data: [DONE]\n\n")
                if out:
                    yield "".join(out)


def _observed(err: APIError) -> APIError:
    """``err``, marked as counted in /metrics already (the request ran: ``_observe``), so the error handler does not
    count it again as a refusal."""
    err.observed = True
    return err


KEEPALIVE = object()  # open_stream's item for "nothing happened for keepalive_s"


async def _hold(queue: asyncio.Queue[Any], hold_s: float, raw: Request | None) -> str:
    """Wait until ``queue`` has a token (a StreamChunk) or the run's end (None), at most ``hold_s``, or until the client
    left (``raw``'s disconnect); what came stays in the queue, in order. Says which: "ended" (the run ended),
    "gone" (the client left), else "go"."""
    if hold_s <= 0:
        return "go"
    held: list[Any] = []

    async def first() -> None:
        while not held or not (held[-1] is None or isinstance(held[-1], StreamChunk)):
            held.append(await queue.get())

    getter = asyncio.ensure_future(first())
    gone = asyncio.ensure_future(_disconnected(raw)) if raw is not None else None
    try:
        done, _ = await asyncio.wait([getter] if gone is None else [getter, gone], timeout=hold_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Cancelled where it waits (Queue.get leaves the item in the queue), before it runs again.
        getter.cancel()
        if gone is not None:
            gone.cancel()
        while not queue.empty():  # put back in order: what was held first, then what came since
            held.append(queue.get_nowait())
        for item in held:
            queue.put_nowait(item)
    if gone is not None and gone in done and not gone.cancelled() and gone.exception() is None:
        return "gone"
    return "ended" if any(item is None for item in held) else "go"
_UNFINISHED = {499: "client disconnected", 503: "server shutting down"}  # a kept trace's error, for runs that raised none


def json_str(text: str) -> str:
    """A string as JSON, as pydantic writes it (UTF-8, not \\u-escaped); orjson is ~10x faster than json.dumps.
    A lone surrogate (orjson refuses it) falls back to json's escape."""
    try:
        return orjson.dumps(text).decode()
    except TypeError:
        return json.dumps(text)


# What a finished request leaves behind: keep(status, result, graph error) (the trace store, for /v1/traces).
Keep = Callable[[int, RunResult | None, GraphError | None], None]


def final_extra(response_format: dict[str, Any] | None, tools: list[dict[str, Any]] | None, tool_choice: Any,
                parallel_tool_calls: bool | None, sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAI fields the final stage's backend gets as they are (FinalOverrides.extra), with the client's
    sampling extras (``SamplingExtras.sampling_extra()``)."""
    extra: dict[str, Any] = dict(sampling) if sampling else {}
    if response_format:
        extra["response_format"] = response_format
    if tools:
        extra["tools"] = tools
        if tool_choice is not None:
            extra["tool_choice"] = tool_choice
        if parallel_tool_calls is not None:
            extra["parallel_tool_calls"] = parallel_tool_calls
    return extra


def finish_reason(c: Candidate) -> str:
    if c.meta.get("tool_calls") and (c.finish_reason or "stop") == "stop":
        return "tool_calls"
    return c.finish_reason or "stop"


def _indexed(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Whole tool calls as one streamed delta each (OpenAI's delta shape carries an index)."""
    return [{"index": j, **c} for j, c in enumerate(calls)] if calls else None
