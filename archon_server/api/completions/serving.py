"""The logic behind POST /v1/completions.

A backend alias is served straight through: the prompt goes to the backend as a raw text completion (no chat
template), so `echo` and `logprobs` mean what they mean to vLLM. An architecture gets each prompt as one user
message and runs exactly as for chat (ChatService's run path): the final stage's text is the completion; `echo`
prepends the prompt; `logprobs` are the final stage's. Several prompts run concurrently; choice `i * n + j` is
sample `j` of prompt `i`, as OpenAI numbers them.
"""

from __future__ import annotations

import asyncio
import weakref
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request

from ...backends.base import (
    REFUSE_OVERFLOW,
    BackendError,
    SamplingParams,
    StreamChunk,
    TokenLogprob,
    Usage,
)
from ...backends.base import CompletionRequest as BackendCompletion
from ...components import FinalOverrides
from ...components.base import DEFAULT_SAMPLING, StreamSink, failure_status
from ...components.state import Candidate
from ...components.trace import Trace, merged_metrics
from ...graph.runtime import GraphError, RunResult
from ..chat.protocol import UsageInfo
from ..chat.serving import _SLOT, ChatService, _TraceSlot
from ..edge import deadline_s
from ..errors import COMPLETIONS_FIELDS, APIError, sse_error
from ..ids import new_id
from ..logprobs import legacy_logprobs
from ..streaming import EventStream, data_event
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse


def _merged_trace(traces: list[Trace], name: str) -> Trace:
    """The request's one trace (/v1/traces keeps one per request id): every prompt's layers in prompt order, their
    usage summed, the longest run's latency, their metrics merged (:func:`_merged_metrics`)."""
    usage, trace = Usage(), Trace(name)
    for t in traces:
        usage.add(t.usage)
        trace.layers.extend(t.layers)
    trace.usage = usage
    trace.latency_s = max((t.latency_s for t in traces), default=0.0)
    trace.metrics = merged_metrics([t.metrics for t in traces])
    return trace


class _PromptsTrace(Trace):
    """The request's one trace while its prompts run, each keeping its own in a slot of its own: merged from theirs
    (:func:`_merged_trace`) whenever it is read, so whatever keeps it has every prompt's calls as they are then. A
    stream the client left keeps its trace at once, as it cancels the run, before the prompts' runs have ended (and
    recorded their cut calls as cancelled); /v1/traces reads it later."""

    def __init__(self, slots: list[_TraceSlot], name: str):
        super().__init__(name)
        self._slots = slots

    def merged(self) -> Trace:
        return _merged_trace([s.trace for s in self._slots if s.trace is not None], self.architecture)

    @property
    def calls(self) -> int:
        return self.merged().calls

    def to_dict(self) -> dict[str, Any]:
        return self.merged().to_dict()


class _PromptSlot(_TraceSlot):
    """One prompt's trace slot: the run's trace as it starts, and the request's slot (``outer``) gets the prompts'
    merged trace then, as a one-prompt run's own goes to it (so a run cut off before any prompt started keeps none)."""

    __slots__ = ("outer", "merged")

    def __init__(self, outer: _TraceSlot | None, merged: Trace):
        super().__init__()
        # Weakly: the merged view holds the slots, and a cycle would outlive the request until the collector ran
        # (tests/test_no_cyclic_garbage.py); the request holds the view while its prompts run, the outer slot after.
        self.outer, self.merged = outer, weakref.ref(merged)

    def __call__(self, trace: Trace) -> None:
        self.trace = trace
        merged = self.merged()
        if self.outer is not None and merged is not None:
            self.outer(merged)


def _merge(results: list[RunResult], name: str) -> RunResult:
    """One result for the request: candidates in prompt order, usage and trace layers summed (metrics count all)."""
    trace = _merged_trace([r.trace for r in results], name)
    return RunResult([c for r in results for c in r.candidates], trace.usage, trace, all(r.streamed for r in results))


async def _all_or_none(coros: list[Any]) -> list[Any]:
    """The prompts' runs, concurrently; when one fails (or the request is cancelled) the others are cancelled and
    awaited before the failure goes on, so none runs on after the request has its answer and each has recorded its
    calls (a cancelled call as ``cancelled``) in the trace the request keeps."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _shifted(sink: StreamSink, offset: int) -> StreamSink:
    async def put(ch: StreamChunk) -> None:
        await sink(replace(ch, index=offset + ch.index))

    return put


class CompletionsService:
    def __init__(self, chat: ChatService):
        self.chat = chat

    def _check(self, req: CompletionRequest, architecture: str | None) -> None:
        """Checks of the request's own values; ``architecture``: the model it names, resolved (None: a backend alias),
        so that an unknown model is a 404 before any of these."""
        if req.n > self.chat.max_n:
            raise APIError(400, f"n: must be <= {self.chat.max_n}", param="n", code="invalid_value")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of: only best_of == n is served (use an architecture to choose among samples)", param="best_of", code="invalid_value")
        if req.max_tokens == 0:  # vLLM's rule: 0 means "the prompt alone", which only echo returns
            if not req.echo:
                raise APIError(400, "max_tokens: must be at least 1 (0 is served with echo: the prompt and its logprobs, nothing generated)",
                               param="max_tokens", code="invalid_value")
            if architecture is not None:
                raise APIError(400, f"max_tokens: 0 (echo without generation) is served on a backend alias, not on the architecture {architecture!r}, "
                               "which writes an answer", param="max_tokens", code="invalid_value")

    def _is_backend(self, req: CompletionRequest) -> bool:
        return req.model not in self.chat.catalog.architectures and req.model in self.chat.registry and not req.architecture

    # -- a backend alias: raw completion ----------------------------------------------------
    def _params(self, req: CompletionRequest) -> SamplingParams:
        extra = req.sampling_extra()
        if req.max_tokens and self.chat.registry.get(req.model).refuses_overflow:  # explicit: OpenAI's 400 past the context
            extra[REFUSE_OVERFLOW] = True
        return SamplingParams(
            temperature=DEFAULT_SAMPLING.temperature if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=extra.pop("top_k", None),
            max_tokens=16 if req.max_tokens is None else req.max_tokens, stop=req.stop, seed=req.seed,
            n=req.n, logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0, extra=extra,
        )

    async def _raw(self, req: CompletionRequest, sink: StreamSink | None) -> RunResult:
        """Every prompt as one raw completion request to the backend, concurrently; traced as one layer. Under the
        request's deadline (server.request_timeout_s from arrival), as a graph run is: past it, a 504. The trace goes
        to the request's slot as the run starts, as a graph run's does (ChatService.run_graph): a run that ends without
        a result (the client gone, the server shutting down) is still in /v1/traces, its cut calls ``cancelled``."""
        alias = req.model
        backend, model, limit = self.chat.registry.get(alias), self.chat.registry.model_name(alias), self.chat.registry.limit(alias)
        trace = Trace(alias)
        slot = _SLOT.get()
        if slot is not None:
            slot(trace)
        layer = trace.add_layer(0, ["completion"], candidates_in=0)
        params = self._params(req)
        metrics: list[dict[str, Any]] = [{} for _ in req.prompt]  # each prompt's call's figures (speculative decoding)

        def record(i: int, started: tuple[int, float], usage: Usage | None = None, error: BaseException | None = None) -> None:
            status = "ok" if error is None else "cancelled" if isinstance(error, asyncio.CancelledError) else failure_status(error)
            layer.finish_call("completion", "completion", alias, req.n, started, usage=usage,
                              error=None if error is None else str(error)[:300] or "cancelled",
                              status=status, purpose=f"prompt {i + 1}")

        async def one(i: int, prompt: str) -> list[Candidate]:
            breq = BackendCompletion(model, prompt, params, echo=req.echo)
            started = layer.call_started("completion", "completion", alias, req.n, f"prompt {i + 1}")
            try:
                async with limit if limit is not None else contextlib.nullcontext():
                    if sink is None:
                        res = await backend.complete(breq)
                        choices = [(c.text, c.finish_reason, c.logprobs) for c in res.choices]
                        usage, metrics[i] = res.usage, res.metrics
                    else:
                        texts: dict[int, list[str]] = {}
                        finish: dict[int, str] = {}
                        usage = Usage()
                        async for ch in backend.stream_complete(breq):
                            if ch.usage is not None:
                                usage, metrics[i] = ch.usage, ch.metrics or metrics[i]
                                continue
                            texts.setdefault(ch.index, []).append(ch.text)
                            if ch.finish_reason:
                                finish[ch.index] = ch.finish_reason
                            await sink(StreamChunk(index=i * req.n + ch.index, text=ch.text, finish_reason=ch.finish_reason, logprobs=ch.logprobs))
                        choices = [("".join(texts.get(j, [])), finish.get(j, "stop"), None) for j in range(req.n)]
            except (BackendError, asyncio.CancelledError) as e:  # cancelled: another prompt failed, or the client left
                record(i, started, error=e)
                raise
            except Exception as e:  # a backend bug must not become a 500 (as for graph calls: components/base.py)
                err = BackendError(f"{type(e).__name__}: {e}"[:300], status=502, backend=alias)
                record(i, started, error=err)
                raise err from e
            record(i, started, usage)
            trace.usage.add(usage)
            return [Candidate(text, source=alias, finish_reason=fr or "stop", meta={"logprobs": lp}) for text, fr, lp in choices]

        try:
            async with asyncio.timeout(deadline_s(self.chat.request_timeout_s)):
                per_prompt = await _all_or_none([one(i, p) for i, p in enumerate(req.prompt)])
        except TimeoutError:
            raise GraphError(f"deadline of {self.chat.request_timeout_s:g}s exceeded", status=504, trace=trace) from None
        except BackendError as e:
            status = 504 if e.status == 504 else 400 if e.status == 400 else 502
            raise GraphError(str(e), status=status, trace=trace) from None
        finally:  # answered, failed or cancelled: the trace says how long it ran and what the backend reported
            trace.latency_s = layer.latency_s = time.perf_counter() - trace.started
            trace.metrics = merged_metrics(metrics)  # as an architecture's prompts' are (_merged_trace)
        cands = [c for cs in per_prompt for c in cs]
        layer.candidates_out = len(cands)
        trace.end_layer(layer)
        return RunResult(cands, trace.usage, trace, streamed=sink is not None)

    # -- an architecture: each prompt is one user message -------------------------------------
    def _final(self, req: CompletionRequest, spec: Any) -> FinalOverrides:
        final = FinalOverrides(n=req.n, temperature=req.temperature, top_p=req.top_p, max_tokens=req.max_tokens, stop=req.stop,
                               seed=req.seed, logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0,
                               extra=req.sampling_extra())
        final = self.chat.refuse_overflow(spec, final)
        self.chat.check_final(spec, final)
        return final

    def _plan(self, req: CompletionRequest) -> tuple[str, Any]:
        """(name, run(sink)) for this request: the raw path for a backend alias, the graph for an architecture."""
        if self._is_backend(req):
            self._check(req, None)
            self.chat.check_sampling(req.model, req.sampling_extra(), "called directly")
            return req.model, lambda sink, _observer=None: self._raw(req, sink)
        spec = self.chat.resolve(req)  # first: an unknown model is a 404 whatever else the request holds
        self._check(req, req.model)
        final = self._final(req, spec)
        traces: list[dict[str, Any]] = []

        async def run(sink: StreamSink | None, _observer: Any = None) -> RunResult:
            # Each prompt's run keeps its trace in a slot of its own (its task's copy of the context), so that a failed
            # request keeps every prompt's calls, merged into its one trace as a finished one's are (_merge): the
            # request's slot held only the trace of the prompt whose run started last, and a failure's own trace only
            # the failed prompt's. The request's slot holds the merged view from the first prompt's start: a stream
            # keeps its trace as it cancels the run (client gone, shutdown), before the runs have ended.
            slots: list[_TraceSlot] = []
            merged_view = _PromptsTrace(slots, spec.name)
            slots.extend(_PromptSlot(_SLOT.get(), merged_view) for _ in req.prompt)

            async def one(i: int, p: str) -> RunResult:
                _SLOT.set(slots[i])
                return await self.chat.run_graph(spec, [{"role": "user", "content": p}], final, None if sink is None else _shifted(sink, i * req.n))

            try:
                results = await _all_or_none([one(i, p) for i, p in enumerate(req.prompt)])
            except GraphError as e:  # every prompt's run has ended (_all_or_none): their calls, merged
                raise GraphError(str(e), status=e.status, trace=merged_view.merged()) from None
            finally:  # the runs have started or never will: no reference cycle (view -> slots -> outer -> view) left
                for s in slots:
                    s.outer = None  # type: ignore[attr-defined]
            traces.extend(r.trace.to_dict() for r in results)
            return _merge(list(results), spec.name)

        run.traces = traces  # type: ignore[attr-defined]
        return spec.name, run

    # -- answers ------------------------------------------------------------------------
    def _trace(self, req: CompletionRequest, run: Any, res: RunResult) -> dict[str, Any] | list[dict[str, Any]] | None:
        if not req.return_trace:
            return None
        traces = getattr(run, "traces", None)
        if traces is None or len(traces) <= 1:
            return res.trace.to_dict()
        return traces  # several prompts through an architecture: one trace each, in prompt order

    def _echo(self, req: CompletionRequest, i: int) -> str:
        return req.prompt[i // req.n] if req.echo and not self._is_backend(req) else ""  # a backend echoes by itself

    async def create(self, req: CompletionRequest, raw: Request) -> dict[str, Any]:
        name, run = self._plan(req)
        cid = new_id("cmpl-")
        res = await self.chat.execute(name, lambda: run(None), raw, keep=self._keeper(req, cid, stream=False), fields=COMPLETIONS_FIELDS)
        choices = []
        for i, c in enumerate(res.candidates):
            pre = self._echo(req, i)
            choices.append(CompletionChoice(index=i, text=pre + c.text, finish_reason=c.finish_reason or "stop",
                                            logprobs=legacy_logprobs(c.meta.get("logprobs"), len(pre)) if req.logprobs is not None else None))
        u = res.usage
        return CompletionResponse(
            id=cid, created=int(time.time()), model=req.model, choices=choices,
            usage=UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens),
            trace=self._trace(req, run, res),
        ).model_dump(exclude_none=True)

    async def create_stream(self, req: CompletionRequest, raw: Request | None = None) -> EventStream:
        name, run = self._plan(req)
        cid = new_id("cmpl-")
        events = await self.chat.open_stream(name, run, keep=self._keeper(req, cid, stream=True), raw=raw, direct=self._is_backend(req),
                                             fields=COMPLETIONS_FIELDS)
        return EventStream(sse_error).of(self._stream(req, cid, run, events))

    def _keeper(self, req: CompletionRequest, cid: str, stream: bool) -> Any:
        """For the trace store (/v1/traces): the prompts as the user messages they become."""
        messages = [{"role": "user", "content": p} for p in req.prompt]
        return lambda status, r, e: self.chat._keep(cid, req.model, messages, stream, status, r, e)

    async def _stream(self, req: CompletionRequest, cid: str, run: Any, events: AsyncIterator[Any]) -> AsyncIterator[str]:
        created = int(time.time())

        # With include_usage, OpenAI's every chunk but the usage one carries `"usage": null`.
        null_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[CompletionChoice], **kw: Any) -> str:
            return data_event(CompletionResponse(id=cid, created=created, model=req.model, choices=choices, **kw), null_usage)

        total = len(req.prompt) * req.n
        want_lp = req.logprobs is not None
        sent = [0] * total  # characters of each choice's text sent so far: where a piece's text_offset starts (vLLM's count)

        def piece(i: int, text: str, lps: list[TokenLogprob] | None) -> str:
            lp = legacy_logprobs(lps, sent[i]) if want_lp and 0 <= i < total else None
            if 0 <= i < total:
                sent[i] += len(text)
            return chunk([CompletionChoice(index=i, text=text, logprobs=lp)])

        async with contextlib.aclosing(events):
            for i in range(total):
                if self._echo(req, i):
                    yield piece(i, self._echo(req, i), None)
            async for item in events:
                if isinstance(item, APIError):
                    yield sse_error(item)
                    return
                if isinstance(item, StreamChunk):
                    if item.text or (want_lp and item.logprobs):
                        yield piece(item.index, item.text, item.logprobs)
                    continue
                res: RunResult = item
                if not res.streamed:
                    for i, c in enumerate(res.candidates):
                        yield piece(i, c.text, c.meta.get("logprobs"))
                for i, c in enumerate(res.candidates):
                    yield chunk([CompletionChoice(index=i, text="", finish_reason=c.finish_reason or "stop")])
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                if include_usage or req.return_trace:
                    u = res.usage
                    yield chunk([], usage=UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens) if include_usage else None,
                                trace=self._trace(req, run, res))
                yield "data: [DONE]\n\n"
