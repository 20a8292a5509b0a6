"""Runs an architecture: layers in order, everything inside a layer concurrently.

Partial failures are tolerated (a layer goes on when at least ``min_success`` of
its calls succeeded); every call is traced; usage is summed over all sub-calls;
cancelling the task (client disconnect, deadline) cancels every in-flight call.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from ..backends.base import BackendError, Usage
from ..backends.registry import BackendRegistry
from ..components import COMPONENTS, ComponentContext, FinalOverrides
from ..components.base import ComponentFailed, StreamSink, gather_tolerant
from ..components.state import Candidate, State, Update
from ..components.trace import LayerTrace, Trace, TraceObserver, candidate_dicts
from ..spec import ArchitectureSpec
from .catalog import is_passthrough
from ..exceptions import ArchonError


class GraphError(ArchonError):
    """The graph could not produce an answer. ``status``: 502 backends failed, 504 deadline/timeouts, 400 bad binding."""

    def __init__(self, message: str, status: int = 502, trace: Trace | None = None):
        super().__init__(message)
        self.status = status
        self.trace = trace


@dataclass
class RunResult:
    candidates: list[Candidate]
    usage: Usage
    trace: Trace
    streamed: bool = False  # the final stage's tokens already went to the sink

    @property
    def text(self) -> str:
        return self.candidates[0].text if self.candidates else ""

    @property
    def choices(self) -> list[str]:
        return [c.text for c in self.candidates]

    @property
    def calls(self) -> int:
        return self.trace.calls


def _realign(old: list[Candidate], old_crit: list[str | None], kept: list[Candidate]) -> list[str | None]:
    """Critiques follow their candidates through a selection (matched by text, first unused)."""
    used: set[int] = set()
    out: list[str | None] = []
    for k in kept:
        j = next((i for i, c in enumerate(old) if i not in used and c.text == k.text), None)
        if j is None:
            out.append(None)
        else:
            used.add(j)
            out.append(old_crit[j] if j < len(old_crit) else None)
    return out


def graph_outline(spec: ArchitectureSpec) -> list[list[dict[str, Any]]]:
    """The layers as a live view draws them before any call: component id, type and model(s)."""
    out = []
    for layer in spec.layers:
        row = []
        for j, c in enumerate(layer):
            row.append({"id": c.id or f"{c.type}{j}", "type": c.type, "models": c.models_used(),
                        "samples": getattr(c, "samples", None)})
        out.append(row)
    return out


_POS = "trace_in_pos"  # meta key: a candidate's position in its layer's input (selections copy candidates)


def _note_outcome(lt: LayerTrace, incoming: list[Candidate], updates: list[Update], state: State) -> None:
    """Record what a layer left: its candidates, and for a selecting layer which incoming ones it kept."""
    lt.candidates_out = len(state.candidates)
    lt.candidates = candidate_dicts(state.candidates)
    if not any(u.candidates for u in updates) and any(u.selected is not None for u in updates):
        lt.kept = [c.meta[_POS] for c in state.candidates if isinstance(c.meta.get(_POS), int)]
    if state.votes:
        lt.votes = dict(state.votes)


def final_choices(cands: list[Candidate], rule: str, n: int, *, keep_order: bool = False) -> list[Candidate]:
    """`top_ranked`: highest score first (ties keep layer order); `first`: layer order. Never random. Either way an
    empty candidate (Candidate.empty) comes after every one with an answer: the answer is empty only when all are.
    ``keep_order``: the final stage streamed its candidates as choices 0, 1...; they stay in that order."""
    if keep_order:
        return cands[: max(n, 1)]

    def key(i: int) -> tuple[bool, float]:
        score = cands[i].score if cands[i].score is not None else float("-inf")
        return cands[i].empty, -score if rule == "top_ranked" else 0.0

    return [cands[i] for i in sorted(range(len(cands)), key=key)][: max(n, 1)]


def set_aside_empty(state: State) -> int:
    """Before a layer that judges or selects (ranker, scorer, critic, verifier, vote, evaluators): the empty candidates
    leave the state when another one has an answer, so no selection can keep an empty one — not one the judge picked,
    nor one kept by a fallback (an unparseable ranking keeps the incoming order, a verifier that passes none keeps all,
    a vote that extracts nothing keeps all, evaluators' ties keep the order) — and a client gets an answer whenever a
    writer wrote one. Their critiques go with them. Returns how many were set aside."""
    keep = [i for i, c in enumerate(state.candidates) if not c.empty]
    dropped = len(state.candidates) - len(keep)
    if not keep or not dropped:
        return 0
    crit = state.critiques
    state.critiques = [crit[i] if i < len(crit) else None for i in keep] if crit else []
    state.candidates = [state.candidates[i] for i in keep]
    return dropped


def fall_back_on_empty(state: State, incoming: list[Candidate], incoming_critiques: list[str | None]) -> int:
    """After a layer that writes (a fuser, a sequential aggregator, a later generator): when every answer it wrote is
    empty (an empty or blank synthesis) and a candidate it was given has an answer, its input stands in for its
    output, less the empty ones (set_aside_empty: the one rule that an empty answer never wins while another has
    one), with their critiques; the final rule then picks among them as it would have (``final``: the best-scored,
    or the first). Returns how many candidates stand in (0: no fallback)."""
    if not incoming or not all(c.empty for c in state.candidates) or all(c.empty for c in incoming):
        return 0
    state.candidates, state.critiques = list(incoming), list(incoming_critiques)
    set_aside_empty(state)
    return len(state.candidates)


def writes(layer: list[Any]) -> bool:
    """Whether a layer writes answers (a generator, fuser, sequential aggregator) rather than selecting or judging."""
    return any(COMPONENTS[c.type].produces for c in layer)


def answer_writer(spec: ArchitectureSpec) -> int | None:
    """The layer the client's writing parameters apply to: the last layer, or, when it selects (a ranker, scorer,
    vote or verifier picks the answer), the last layer before it that writes the answers it picks from."""
    return next((i for i in range(len(spec.layers) - 1, -1, -1) if writes(spec.layers[i])), None)


def streams_final(spec: ArchitectureSpec) -> bool:
    """The final stage's tokens can go to the client as they come: one component, of a kind that streams."""
    last = spec.layers[-1]
    return len(last) == 1 and COMPONENTS[last[0].type].streamable and len(last[0].models_used()) == 1


async def _run_all(comps: list[Any], ctxs: list[ComponentContext], state: State) -> list[Any]:
    """Every component of a layer concurrently, each one's Update or exception in its place (a layer of one
    component, most final stages, runs in this task: see gather_tolerant)."""
    return await gather_tolerant([c.run(x, state) for c, x in zip(comps, ctxs)])


class GraphRuntime:
    def __init__(self, registry: BackendRegistry):
        self.registry = registry
        # (alias, capability, protocol) -> None (can) or why not: scorers' needs, asked of each backend once.
        self._scoring: dict[tuple[str, str, str], str | None] = {}

    async def scoring_problems(self, spec: ArchitectureSpec, *, probe: bool = True) -> list[str]:
        """Why ``spec``'s scorers cannot run on the bound backends (empty: they can).

        ``probe=False`` (start-up) uses only what a backend knows about itself (the embedded engine scores but
        has no reward model; a backend without scoring says so); an HTTP upstream's answer is only known by asking,
        which happens with ``probe=True`` once per alias and capability, before the first such architecture runs
        (so its generators never run for a scorer that would then fail)."""
        problems = []
        for alias, need, protocol in spec.scoring_needs():
            if alias not in self.registry:
                continue  # reported by check_bindings
            key = (alias, need, protocol)
            if key not in self._scoring:
                try:
                    await self.registry.get(alias).check_scoring(need, self.registry.model_name(alias), protocol or "vllm_score", probe=probe)
                    if probe:  # without a probe, "no objection" from an upstream is not yet an answer
                        self._scoring[key] = None
                except BackendError as e:
                    self._scoring[key] = str(e)
            if self._scoring.get(key):
                problems.append(f"alias {alias!r}: {self._scoring[key]}")
        return problems

    def check_bindings(self, spec: ArchitectureSpec) -> list[str]:
        return [m for m in spec.models_used() if m not in self.registry]

    async def run(
        self,
        spec: ArchitectureSpec,
        messages: list[dict[str, Any]],
        *,
        final: FinalOverrides | None = None,
        sink: StreamSink | None = None,
        deadline_s: float | None = None,
        deadline_label: float | None = None,
        unit_tests: list[str] | None = None,
        observer: TraceObserver | None = None,
        on_trace: Callable[[Trace], None] | None = None,
    ) -> RunResult:
        """Run ``spec`` on ``messages``. ``final``: the client's parameters for the final stage, only the fields given
        (a field left None keeps the architecture's own value). ``unit_tests``: tests given by the caller (e.g. a
        dataset's), seen by evaluators.
        ``observer`` hears the trace's events as they happen (see components/trace.py). ``on_trace`` gets the trace
        as the run starts, so a caller whose run is cancelled (client gone) still holds what it did."""
        missing = self.check_bindings(spec)
        if missing:
            raise GraphError(f"architecture {spec.name!r} uses unknown model alias(es): {', '.join(missing)}", status=400)
        unable = await self.scoring_problems(spec)
        if unable:
            raise GraphError(f"architecture {spec.name!r} cannot run its scorer: {'; '.join(unable)}", status=400)
        final = final or FinalOverrides()
        trace = Trace(spec.name, observer=observer)
        if on_trace is not None:
            on_trace(trace)
        if observer is not None:  # the outline is built only for a live view
            trace.emit({"type": "run_started", "architecture": spec.name, "graph": graph_outline(spec)})
        # ``deadline_label``: the deadline as the client knows it (the server's request_timeout_s), when
        # ``deadline_s`` is what is left of it; the 504 names that, not "1.99948s".
        deadline, label = (deadline_s, deadline_label or deadline_s) if deadline_s is not None else (spec.deadline_s, spec.deadline_s)
        if spec.deadline_s is not None and deadline is not None and spec.deadline_s < deadline:
            deadline = label = spec.deadline_s
        try:
            async with asyncio.timeout(deadline):
                return await self._run(spec, messages, final, sink, trace, unit_tests or [])
        except TimeoutError:
            raise GraphError(f"deadline of {label:g}s exceeded", status=504, trace=trace) from None
        finally:  # failed, cancelled or not: the trace says how long it ran
            trace.latency_s = time.perf_counter() - trace.started

    async def _run(
        self, spec: ArchitectureSpec, messages: list[dict[str, Any]], final: FinalOverrides, sink: StreamSink | None, trace: Trace, unit_tests: list[str]
    ) -> RunResult:
        state = State(messages=messages, unit_tests=list(unit_tests))
        usage = trace.usage
        streamed = False
        last = len(spec.layers) - 1
        writer = answer_writer(spec)
        # A selecting final stage: its input's writers get what the answer must be (FinalOverrides.for_writers).
        feeder = final.for_writers() if writer is not None and writer != last else None
        for li, layer in enumerate(spec.layers):
            comps = [COMPONENTS[c.type](c, j) for j, c in enumerate(layer)]
            incoming, incoming_critiques = list(state.candidates), list(state.critiques)
            for pos, c in enumerate(incoming):
                c.meta[_POS] = pos
            lt = trace.add_layer(li, [c.id for c in comps], len(incoming))
            if not writes(layer) and (k := set_aside_empty(state)):
                lt.notes.append(f"{k} empty candidate(s) of {len(incoming)} set aside: judged and selected among those with an answer")
            is_final = li == last
            stream_here = sink is not None and is_final and streams_final(spec)
            ctxs = [
                ComponentContext(
                    self.registry, lt, usage, spec.defaults, comp.id, comp.type,
                    final=final if is_final else (feeder if li == writer else None),
                    sink=sink if stream_here else None,
                    metrics=trace.metrics,
                    seed_base=None if final.seed is None else (final.seed + 7919 * li + 131 * j) % 2**31,
                )
                for j, comp in enumerate(comps)
            ]
            t0 = time.perf_counter()
            results = await _run_all(comps, ctxs, state)
            lt.latency_s = time.perf_counter() - t0
            updates: list[Update] = []
            for comp, r in zip(comps, results):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                if isinstance(r, ComponentFailed) and any(c.component == comp.id and not c.ok for c in lt.calls):
                    continue  # "every call failed": its calls' own errors are in the layer's failures already
                if isinstance(r, BaseException):
                    lt.failures.append(f"{comp.id}: {type(r).__name__}: {r}"[:300])
                else:
                    updates.append(r)
            ok_calls = sum(x.ok_calls for x in ctxs)
            if not updates or (lt.calls and ok_calls < spec.min_success):
                trace.end_layer(lt)  # the live view learns the layer failed
            if not updates:
                raise GraphError(self._failed(spec, li, lt), status=self._status(lt), trace=trace)
            if lt.calls and ok_calls < spec.min_success:
                raise GraphError(
                    f"layer {li}: {ok_calls} of {len(lt.calls)} calls succeeded, fewer than min_success={spec.min_success}",
                    status=self._status(lt), trace=trace,
                )
            self._merge(state, updates)
            if writes(layer) and (k := fall_back_on_empty(state, incoming, incoming_critiques)):
                lt.notes.append(f"fallback: every answer this layer wrote was empty; its input's {k} candidate(s) with an answer"
                                " stand in for them")
                stream_here = False  # nothing was sent (blank pieces are held, and dropped here): the answer goes out whole
            elif stream_here:
                for x in ctxs:  # blank answers that no fallback replaces: sent as written
                    await x.release_held()
            _note_outcome(lt, incoming, updates, state)
            trace.end_layer(lt)
            if not state.candidates:
                raise GraphError(f"layer {li} left no candidate", status=502, trace=trace)
            streamed = streamed or stream_here
        return RunResult(final_choices(state.candidates, spec.final, final.n, keep_order=streamed), usage, trace, streamed)

    @staticmethod
    def _failed(spec: ArchitectureSpec, li: int, lt: LayerTrace) -> str:
        """Why a layer failed. A backend model served straight through says what its backend said, as that model's
        own server would (``logit_bias: token id(s) [...] out of the vocabulary``), not ``layer 0 failed: generator0: ...``."""
        errors = [c.error for c in lt.calls if not c.ok and c.error]
        if is_passthrough(spec) and errors:
            return "; ".join(dict.fromkeys(errors))
        return f"layer {li} failed: " + "; ".join(lt.failures[-3:])

    @staticmethod
    def _status(lt: LayerTrace) -> int:
        """504 when every failed call timed out, 400 when the backends refused every one as invalid (a prompt past the
        model's context: the client's to fix, and a 502 would have the SDKs send it again), else 502."""
        failed = [c.status for c in lt.calls if not c.ok]
        if failed and all(s == "timeout" for s in failed):
            return 504
        return 400 if failed and all(s == "invalid" for s in failed) else 502

    @staticmethod
    def _merge(state: State, updates: list[Update]) -> None:
        produced = [c for u in updates if u.candidates for c in u.candidates]
        selected = next((u.selected for u in updates if u.selected is not None), None)
        critiques = next((u.critiques for u in updates if u.critiques is not None), None)
        for u in updates:
            if u.unit_tests:
                state.unit_tests.extend(u.unit_tests)
            if u.votes:
                state.votes = u.votes
        if produced:
            state.candidates, state.critiques = produced, []
        elif selected is not None:
            base_crit = critiques if critiques is not None else state.critiques
            state.critiques = _realign(state.candidates, base_crit, selected)
            state.candidates = selected
        elif critiques is not None:
            state.critiques = critiques


__all__ = ["GraphError", "GraphRuntime", "RunResult"]
