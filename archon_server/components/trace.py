"""Per-request trace: what every layer called, how long it took, what it cost.

The trace is also the one place progress is observed from: a :class:`Trace` may carry an ``observer``
(a plain callback) that hears every call start and end and every layer start and end as they are recorded
here, so a live view (the web console, ``stream_trace``) needs no second bookkeeping path.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import Usage

# An event is a JSON-ready dict with a "type": run_started | layer_started | call_started | call_ended | layer_ended.
TraceObserver = Callable[[dict[str, Any]], None]

# Candidate texts kept per layer in a trace (each cut to this many characters): enough to read them in the console.
MAX_CANDIDATE_CHARS = 20_000


# Backend figures that count (summed when calls or prompts are merged); every other number is a rate or a mean.
_COUNTERS = ("target_forward_passes", "emitted_tokens")


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _weight_key(key: str) -> str:
    """What a rate or mean is an average over: the tokens emitted for a per-token figure, else the tokens drafted
    (vLLM's ``draft_acceptance_rate`` and ``mean_acceptance_length``, the engine's ``mean_k``)."""
    return "emitted_tokens" if key.endswith("_per_token") else "num_draft_tokens"


def merged_metrics(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One set of ``Trace.metrics`` (the backends' speculative-decoding figures) from several calls' or prompts':
    the one rule for a run that sums its calls' and for a completion whose prompts each ran (api/completions).

    * a counter (``num_*``, ``target_forward_passes``, ``emitted_tokens``) is summed;
    * any other number is a rate or a mean: the parts' mean weighted by the count it averages over
      (:func:`_weight_key`) where every part giving it has that count, else equally. So the merged acceptance rate
      is all accepted draft tokens over all drafted ones, as one call's is; merging pairwise in turn gives the
      same as merging all at once, since the counts are summed alongside;
    * a figure every part gives alike stays as it is; one that is not a number and differs is left out;
    * a figure only some parts give is theirs alone; one part: its figures as they are."""
    given = [m for m in parts if m]
    if len(given) <= 1:
        return dict(given[0]) if given else {}
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for m in given for k in m):
        have = [m for m in given if key in m]
        values = [m[key] for m in have]
        numbers = all(map(is_number, values))
        if numbers and (key.startswith("num_") or key in _COUNTERS):
            out[key] = sum(values)
        elif all(v == values[0] for v in values):
            out[key] = values[0]
        elif numbers:
            weights = [m.get(_weight_key(key)) for m in have]
            if not all(is_number(w) and w >= 0 for w in weights) or not sum(weights):
                weights = [1] * len(values)
            out[key] = sum(v * w for v, w in zip(values, weights)) / sum(weights)
    return out


@dataclass
class CallRecord:
    component: str
    type: str
    model: str
    n: int
    ok: bool
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 1
    error: str | None = None
    purpose: str = ""  # e.g. "candidate 3", "retry: parse failure"
    status: str = "ok"  # ok | error | timeout | invalid | cancelled: set from the exception (components.base.failure_status)
    id: int = 0  # call number within the request (matches call_started / call_ended events)
    start_s: float = 0.0  # when the call began, seconds after the request started (the waterfall's x)

    def to_dict(self) -> dict[str, Any]:
        # Every field is a scalar: a flat copy of the instance's dict (its fields, in their order), not
        # dataclasses.asdict (a recursive deepcopy, ~10x the cost per call) nor a getattr per field (~5x).
        out = self.__dict__.copy()
        out["latency_s"] = round(self.latency_s, 4)
        out["start_s"] = round(self.start_s, 4)
        return out


@dataclass
class LayerTrace:
    index: int
    components: list[str]
    candidates_in: int = 0
    candidates_out: int = 0
    latency_s: float = 0.0
    calls: list[CallRecord] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    start_s: float = 0.0
    # The candidates this layer left (text, source, score); `kept`: for a selecting layer (ranker, verifier,
    # vote...) the positions of the incoming candidates it kept, in its order; `votes`: a vote's counts.
    candidates: list[dict[str, Any]] = field(default_factory=list)
    kept: list[int] | None = None
    votes: dict[str, int] = field(default_factory=dict)
    # The trace this layer belongs to, by weak reference: a strong one made every request's Trace, its layers, calls
    # and their lists a reference cycle (17 objects per self-moa request) that only the cyclic collector frees, and
    # that garbage was what triggered its collections while serving (each walking every request in flight).
    _trace: weakref.ReferenceType[Trace] | None = field(default=None, repr=False, compare=False)

    def _owner(self) -> Trace | None:
        return self._trace() if self._trace is not None else None

    def call_started(self, component: str, ctype: str, model: str, n: int, purpose: str = "") -> tuple[int, float]:
        """Number a call and note its start; returns (id, perf_counter at start) for :meth:`record`."""
        t0 = time.perf_counter()
        tr = self._owner()
        if tr is None:
            return 0, t0
        tr._next_call += 1
        if tr.observer is not None:
            tr.emit({"type": "call_started", "layer": self.index, "call": tr._next_call, "component": component, "ctype": ctype,
                     "model": model, "n": n, "purpose": purpose, "start_s": round(t0 - tr.started, 4)})
        return tr._next_call, t0

    def record(self, rec: CallRecord, started: tuple[int, float] | None = None) -> CallRecord:
        """Append a finished call (the one path every call record takes) and tell the observer."""
        tr = self._owner()
        if started is not None:
            rec.id = started[0]
            if tr is not None:
                rec.start_s = started[1] - tr.started
        self.calls.append(rec)
        if tr is not None and tr.observer is not None:  # no event built when nobody listens
            tr.emit({**rec.to_dict(), "type": "call_ended", "ctype": rec.type, "layer": self.index, "call": rec.id})
        return rec

    def finish_call(self, component: str, ctype: str, model: str, n: int, started: tuple[int, float], *,
                    usage: Usage | None = None, requests: int = 1, error: str | None = None, status: str = "ok",
                    purpose: str = "") -> CallRecord:
        """The one CallRecord builder: a call begun with :meth:`call_started` has ended (``status`` ok, or the
        failure's: error | timeout | invalid | cancelled); a failure other than a cancellation also enters ``failures``."""
        u = usage or Usage()
        rec = self.record(CallRecord(component, ctype, model, n, status == "ok", time.perf_counter() - started[1],
                                     u.prompt_tokens, u.completion_tokens, requests, error=error, purpose=purpose,
                                     status=status), started)
        if error is not None and status != "cancelled":
            self.failures.append(f"{component}: {error[:200]}")
        return rec

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k[0] != "_" and k != "calls"}  # the fields, in their order
        out["latency_s"] = round(self.latency_s, 4)
        out["start_s"] = round(self.start_s, 4)
        out["calls"] = [c.to_dict() for c in self.calls]
        return out


@dataclass
class Trace:
    architecture: str
    layers: list[LayerTrace] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    started: float = field(default_factory=time.perf_counter)
    latency_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    observer: TraceObserver | None = field(default=None, repr=False, compare=False)
    _next_call: int = field(default=0, repr=False, compare=False)

    @property
    def calls(self) -> int:
        return sum(c.requests for layer in self.layers for c in layer.calls)

    def emit(self, event: dict[str, Any]) -> None:
        """Hand an event to the observer; an observer's failure never fails the request."""
        if self.observer is not None:
            try:
                self.observer(event)
            except Exception:  # noqa: BLE001 - a live view going away must not break the graph
                self.observer = None

    def add_layer(self, index: int, components: list[str], candidates_in: int) -> LayerTrace:
        lt = LayerTrace(index, components, candidates_in=candidates_in, start_s=time.perf_counter() - self.started, _trace=weakref.ref(self))
        self.layers.append(lt)
        if self.observer is not None:  # no event built when nobody listens
            self.emit({"type": "layer_started", "layer": index, "components": components, "candidates_in": candidates_in,
                       "start_s": round(lt.start_s, 4)})
        return lt

    def end_layer(self, lt: LayerTrace) -> None:
        if self.observer is not None:
            self.emit({"type": "layer_ended", "layer": lt.index, **{k: v for k, v in lt.to_dict().items() if k != "calls"}})

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "latency_s": round(self.latency_s, 4),
            "calls": self.calls,
            "usage": {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "total_tokens": self.usage.total_tokens,
            },
            "metrics": self.metrics,
            "layers": [layer.to_dict() for layer in self.layers],
        }


def candidate_dicts(cands: list[Any]) -> list[dict[str, Any]]:
    """What a trace keeps of a layer's candidates (texts cut to MAX_CANDIDATE_CHARS)."""
    return [{"text": c.text[:MAX_CANDIDATE_CHARS], "source": c.source, "score": c.score,
             **({"truncated": True} if len(c.text) > MAX_CANDIDATE_CHARS else {})} for c in cands]
