"""What every component gets to do its work: backend calls that are traced, limited and counted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from ..backends.base import (
    BackendError,
    BackendTimeout,
    ChatRequest,
    ChatResult,
    Choice,
    SamplingParams,
    StreamChunk,
    Usage,
    accumulate_tool_calls,
)
from ..backends.registry import BackendRegistry, UnknownModel
from ..spec import Sampling
from .state import State, Update
from .trace import LayerTrace, is_number, merged_metrics
from ..exceptions import ArchonError

T = TypeVar("T")
R = TypeVar("R")

# Built-in sampling when neither the component nor the architecture says otherwise.
DEFAULT_SAMPLING = Sampling(temperature=0.7, top_p=1.0, max_tokens=512)
# Judges (ranker, critic, verifier, evaluators) default to greedy: their output is parsed, not read.
JUDGE_SAMPLING = Sampling(temperature=0.0, top_p=1.0, max_tokens=512)


class ParseError(ArchonError, ValueError):
    """A model's output could not be parsed into the structure a component needs."""


class ComponentFailed(ArchonError):
    """Every call of a component failed; the layer decides (min_success) whether that is fatal."""


@dataclass
class FinalOverrides:
    """Client parameters that apply to the final stage (see README: 'How request parameters apply')."""

    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    # Passed to the final stage's backend calls as they are: `response_format`, `tools`, `tool_choice` (OpenAI's shapes)
    # and the client's SAMPLING_EXTRAS (`top_k` goes to SamplingParams.top_k).
    extra: dict[str, Any] = field(default_factory=dict)
    # n sets the number of samples of the stage that gets these. False on the writers whose answers a selecting final
    # stage (ranker, scorer, vote, verifier) picks from (see for_writers).
    sets_samples: bool = True

    def for_writers(self) -> "FinalOverrides":
        """What the writers before a selecting final stage get: what the answer must be — its length (max_tokens,
        min_tokens, ignore_eos, stop), its format (response_format), the tokens it may use (logit_bias) — and its
        logprobs. Not how to sample (temperature, top_p, seed, top_k, min_p, penalties) nor how many: the writers keep
        their own, since a selector needs varied samples to choose from (a client's temperature 0 or one seed for all
        would make them identical), and their seeds already derive from the client's."""
        extra = {k: v for k, v in self.extra.items() if k in ANSWER_SHAPING}
        return replace(self, sets_samples=False, temperature=None, top_p=None, seed=None, extra=extra)


# The FinalOverrides.extra keys that shape the answer itself (for_writers); the rest of SAMPLING_EXTRAS shape sampling.
# A continued final assistant message (vLLM's chat-template switches) is the answer's beginning.
ANSWER_SHAPING = frozenset({"response_format", "min_tokens", "ignore_eos", "logit_bias", "continue_final_message",
                            "add_generation_prompt"})


StreamSink = Callable[[StreamChunk], Awaitable[None]]


@dataclass
class ComponentContext:
    """One component's view of the run: bound to that component (``component`` id, ``ctype`` type), so every
    call it makes is traced, limited and counted under its name without the component repeating it."""

    registry: BackendRegistry
    layer: LayerTrace
    usage: Usage
    defaults: Sampling
    component: str = ""
    ctype: str = ""
    final: FinalOverrides | None = None  # set on the final layer only
    sink: StreamSink | None = None  # set when this component's output is streamed to the client
    metrics: dict[str, Any] = field(default_factory=dict)
    ok_calls: int = 0
    # A client seed makes the whole graph reproducible: inner calls without a seed of their own get one derived from it.
    seed_base: int | None = None
    # Streamed pieces of answers that stayed blank, not sent yet: a writer's every answer blank may be replaced by its
    # input (graph/runtime.fall_back_on_empty), and blank text sent ahead of that answer would stay in the client's.
    # The runtime sends them (release_held) when no fallback took their place, else drops them.
    held: list[StreamChunk] = field(default_factory=list)

    async def release_held(self) -> None:
        """Send the held blank pieces (see ``held``): the stream announces and finishes every choice it answers."""
        chunks, self.held = self.held, []
        for ch in chunks:
            await self.sink(ch)  # type: ignore[misc]  # held only where there is a sink

    def sampling(self, spec: Sampling, judge: bool = False, apply_final: bool = True) -> SamplingParams:
        """Resolve component > architecture defaults > built-ins; the client's values win on the final stage."""
        base = JUDGE_SAMPLING if judge else DEFAULT_SAMPLING
        val: dict[str, Any] = {}
        for k in ("temperature", "top_p", "max_tokens", "seed", "stop"):
            v = getattr(spec, k, None)
            if v is None and not judge:
                v = getattr(self.defaults, k)
            if v is None:
                v = getattr(base, k)
            val[k] = v
        if val["seed"] is None and self.seed_base is not None:
            val["seed"] = self.seed_base
        final = self.final if (apply_final and not judge) else None
        if final is not None:
            for k in ("temperature", "top_p", "max_tokens", "seed", "stop"):
                fv = getattr(final, k)
                if fv is not None:
                    val[k] = fv
        extra = dict(final.extra) if final else {}
        return SamplingParams(
            temperature=float(val["temperature"]),
            top_p=float(val["top_p"]),
            top_k=extra.pop("top_k", None),
            max_tokens=int(val["max_tokens"]),
            seed=val["seed"],
            stop=val["stop"],
            logprobs=bool(final.logprobs) if final else False,
            top_logprobs=int(final.top_logprobs) if final else 0,
            extra=extra,
        )

    def _record(self, alias: str, n: int, started: tuple[int, float], *, status: str = "ok", error: str | None = None,
                result: Any = None, purpose: str = "", ctype: str | None = None) -> None:
        """This component's call has ended: into the trace through the one builder (LayerTrace.finish_call)."""
        self.layer.finish_call(self.component, ctype or self.ctype, alias, n, started,
                               usage=result.usage if result is not None else None,
                               requests=result.requests if result is not None else 1,
                               error=error, status=status, purpose=purpose)

    async def call(
        self,
        alias: str,
        messages: list[dict[str, Any]],
        params: SamplingParams,
        *,
        n: int = 1,
        purpose: str = "",
        stream: bool = False,
        ctype: str | None = None,
    ) -> ChatResult:
        """One logical call for ``n`` samples: one ``n=k`` request when the backend allows, else k concurrent ones.

        ``stream``: send the tokens to the client's sink as they come (only when this context has one).
        ``ctype``: record the call under another component type (self_moa_seq's proposals are generator calls)."""
        started = self.layer.call_started(self.component, ctype or self.ctype, alias, n, purpose)
        try:
            backend = self.registry.get(alias)
            model = self.registry.model_name(alias)
        except UnknownModel:
            err = f"unknown model alias {alias!r}"
            self._record(alias, n, started, status="error", error=err, purpose=purpose, ctype=ctype)
            raise BackendError(err, status=400) from None
        limit = self.registry.limit(alias)
        if n == 1 or backend.supports_n:
            reqs = [ChatRequest(model, messages, params.with_n(n))]
        else:
            # One request per sample; offset seeds so seeded samples still differ.
            reqs = [
                ChatRequest(model, messages, replace(params, n=1, seed=None if params.seed is None else params.seed + i))
                for i in range(n)
            ]
        if stream and self.sink is not None:
            work = self._streamed(backend, reqs, limit)
        elif len(reqs) == 1:
            work = _limited(limit, lambda: backend.chat(reqs[0]))
        else:
            work = _gathered(limit, backend, reqs)
        res = await self._traced(alias, n, purpose, ctype, started, work)
        if res.metrics:  # the run's figures so far and this call's, by the one rule (numbers only, as before);
            # in place: the dict is the trace's, shared by the run's contexts
            merged = merged_metrics([self.metrics, {k: v for k, v in res.metrics.items() if is_number(v)}])
            self.metrics.clear()
            self.metrics.update(merged)
        return res

    async def scored(self, alias: str, fn: Callable[[Any, str], Awaitable[R]], *, n: int = 1, purpose: str = "") -> R:
        """One scoring call, traced, limited and counted like :meth:`call`: ``fn(backend, upstream_model)`` is
        ``backend.score(...)``, ``backend.next_token_logprobs(...)`` or ``backend.reward(...)``; its result carries
        ``usage`` and ``requests``. ``n``: how many candidates it scores (the trace's n)."""
        started = self.layer.call_started(self.component, self.ctype, alias, n, purpose)
        try:
            backend = self.registry.get(alias)
            model = self.registry.model_name(alias)
        except UnknownModel:
            err = f"unknown model alias {alias!r}"
            self._record(alias, n, started, status="error", error=err, purpose=purpose)
            raise BackendError(err, status=400) from None
        return await self._traced(alias, n, purpose, None, started, _limited(self.registry.limit(alias), lambda: fn(backend, model)))

    async def _traced(self, alias: str, n: int, purpose: str, ctype: str | None, started: tuple[int, float], work: Awaitable[Any]) -> Any:
        """Await one backend call and record it (success, failure or cancellation): the one error path of every call."""
        try:
            res = await work
        except asyncio.CancelledError:
            self._record(alias, n, started, status="cancelled", error="cancelled", purpose=purpose, ctype=ctype)
            raise
        except BackendError as e:
            self._record(alias, n, started, status=failure_status(e), error=str(e)[:300], purpose=purpose, ctype=ctype)
            raise
        except Exception as e:  # a backend bug must not become a 500: record it as a failed call
            msg = f"{type(e).__name__}: {e}"[:300]
            self._record(alias, n, started, status="error", error=msg, purpose=purpose, ctype=ctype)
            raise BackendError(msg, status=502) from e
        self.usage.add(res.usage)
        self.ok_calls += 1
        self._record(alias, n, started, result=res, purpose=purpose, ctype=ctype)
        return res

    async def _streamed(self, backend: Any, reqs: list[ChatRequest], limit: asyncio.Semaphore | None) -> ChatResult:
        """Stream every request to the sink at once; request i's choices are numbered after those of the ones before
        (one request of n=k: indices as the backend gives them; k requests of n=1: request i is choice i)."""
        assert self.sink is not None
        sink = self.sink
        texts: dict[int, list[str]] = {}
        finish: dict[int, str] = {}
        calls: dict[int, dict[int, dict[str, Any]]] = {}
        usage = Usage()
        metrics: dict[str, Any] = {}

        opened: set[int] = set()  # choices with an answer so far (text that is not blank, or a tool call)
        held: dict[int, list[StreamChunk]] = {}  # a choice's leading blank pieces (and its finish, if it stays blank)

        async def one(i: int, req: ChatRequest) -> None:
            nonlocal metrics
            offset = i if len(reqs) > 1 else 0
            async for ch in backend.stream(req):
                if ch.usage is not None:
                    usage.add(ch.usage)
                    metrics = ch.metrics or metrics
                    continue
                idx = ch.index + offset
                if ch.text:
                    texts.setdefault(idx, []).append(ch.text)
                if ch.finish_reason:
                    finish[idx] = ch.finish_reason
                if ch.tool_calls:
                    accumulate_tool_calls(calls.setdefault(idx, {}), ch.tool_calls)
                out = ch if ch.index == idx else replace(ch, index=idx)  # no copy per token when unchanged
                if idx not in opened:
                    if not ((ch.text and not ch.text.isspace()) or ch.tool_calls):
                        held.setdefault(idx, []).append(out)
                        continue
                    opened.add(idx)
                    for early in held.pop(idx, ()):
                        await sink(early)
                await sink(out)

        await asyncio.gather(*(_limited(limit, partial(one, i, r)) for i, r in enumerate(reqs)))
        if opened:  # some answer was written: no fallback takes the blank ones' place (fall_back_on_empty), send them
            for i in sorted(held):
                for early in held.pop(i):
                    await sink(early)
        else:
            self.held.extend(c for i in sorted(held) for c in held[i])
        idx = sorted(set(texts) | set(finish) | set(calls)) or [0]
        return ChatResult(
            choices=[Choice("".join(texts.get(i, [])), finish.get(i, "stop"), i,
                            tool_calls=[c for _, c in sorted(calls[i].items())] if i in calls else None) for i in idx],
            usage=usage, metrics=metrics, requests=len(reqs),
        )

    async def judge_each(
        self, alias: str, user_prompts: list[str], params: SamplingParams, parser: Callable[[str], T], *, purpose: str = "candidate"
    ) -> list[T | None]:
        """One parsed judge call per candidate, all concurrently. A failed call is None in its place (recorded in
        the trace); if every call failed the component fails. Unparseable output is None too (see call_parsed)."""
        results = await gather_tolerant(
            [self.call_parsed(alias, user_prompt(p), params, parser, purpose=f"{purpose} {i + 1}") for i, p in enumerate(user_prompts)]
        )
        if user_prompts and all(isinstance(r, BaseException) for r in results):
            raise ComponentFailed(f"{self.component}: every call failed")
        return [None if isinstance(r, BaseException) else r for r in results]

    async def call_parsed(
        self, alias: str, messages: list[dict[str, Any]], params: SamplingParams, parser: Callable[[str], T], *, purpose: str = ""
    ) -> T | None:
        """Call and parse; a parse failure retries once, then returns None and records the degradation."""
        for attempt in range(2):
            res = await self.call(alias, messages, params, purpose=purpose + (" (retry)" if attempt else ""))
            try:
                return parser(res.choices[0].text if res.choices else "")
            except ParseError as e:
                self.layer.notes.append(f"{self.component}: unparseable output{' after retry' if attempt else ''} ({e})")
                # A second greedy call would repeat the same text: sample the retry a little.
                params = replace(params, temperature=max(params.temperature, 0.7), seed=None if params.seed is None else params.seed + 1)
        return None


def failure_status(e: BaseException) -> str:
    """A failed call's CallRecord status, from the exception: ``timeout``; ``invalid`` when the backend refused the
    request itself (400: a prompt longer than the model's context, a parameter it does not take); else ``error``. The
    runtime answers 504 when a failed layer's failures are all timeouts, 400 when they are all refusals."""
    if isinstance(e, BackendTimeout):
        return "timeout"
    return "invalid" if isinstance(e, BackendError) and e.status == 400 else "error"


async def _limited(limit: asyncio.Semaphore | None, start: Callable[[], Awaitable[T]]) -> T:
    """``start()`` once a slot of ``limit`` is held.  A factory, not a coroutine: a call cancelled while queued
    for a slot, or before its task first ran (a client that went away), never creates one, so none is left
    behind unawaited ("coroutine ... was never awaited", seen in the soak)."""
    if limit is None:
        return await start()
    await limit.acquire()
    try:
        return await start()
    finally:
        limit.release()


async def _gathered(limit: asyncio.Semaphore | None, backend: Any, reqs: list[ChatRequest]) -> ChatResult:
    return _merge_results(await asyncio.gather(*(_limited(limit, partial(backend.chat, r)) for r in reqs)))


def _merge_results(parts: list[ChatResult]) -> ChatResult:
    usage = Usage()
    choices = []
    for i, p in enumerate(parts):
        usage.add(p.usage)
        for c in p.choices:
            choices.append(Choice(c.text, c.finish_reason, i, c.logprobs, c.tool_calls))
    return ChatResult(choices=choices, usage=usage, model=parts[0].model if parts else "", requests=len(parts))


async def gather_tolerant(aws: list[Awaitable[T]]) -> list[T | BaseException]:
    """Run concurrently; return exceptions in place instead of cancelling siblings (partial failure tolerance).
    One awaitable (a generator of one model, most of them) is awaited in this task: gather's task for it cost
    ~9 us per call (issue 20). Only this task's own cancellation can reach it here, so that is raised as gather
    would raise it."""
    if len(aws) == 1:
        try:
            return [await aws[0]]
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - in its place, as gather(return_exceptions=True) returns it
            return [e]
    return await asyncio.gather(*aws, return_exceptions=True)


class Component:
    """A component type: ``run`` reads the state and returns an :class:`Update`."""

    type: str = ""
    produces = False  # adds new candidates
    streamable = False  # its (single) call can be streamed to the client when it is the final stage

    def __init__(self, spec: Any, index: int):
        self.spec = spec
        self.id = spec.id or f"{spec.type}{index}"

    async def run(self, ctx: ComponentContext, state: State) -> Update:  # pragma: no cover - abstract
        raise NotImplementedError


def numbered_texts(texts: list[str]) -> str:
    """Candidates as a judge reads them: ``[1] text``, a blank line between."""
    return "\n\n".join(f"[{i + 1}] {t}" for i, t in enumerate(texts))


def user_prompt(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]
