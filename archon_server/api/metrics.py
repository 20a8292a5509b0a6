"""Prometheus metrics (one registry per app, so several apps can live in one process).

With ``archon serve --workers N`` the workers count together: the parent points ``PROMETHEUS_MULTIPROC_DIR`` at a
fresh directory, prometheus_client keeps every worker's values in files there (its multiprocess mode), and whichever
worker answers ``/metrics`` reports the sums, so a counter does not jump between scrapes that different workers
answer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..backends.base import numeric_stats

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode: read when it is first imported


# Backend stats that only grow (the engine's counts since start, vLLM's restarts): Prometheus counters, exposed as
# ``archon_backend_<name>_total``; every other numeric stat (batch and cache sizes, the hit rate) is a gauge.
COUNTER_STATS = frozenset({
    "requests", "prefills", "prefill_tokens", "prefill_chunks_interleaved", "overtakes", "job_steps", "job_steps_interleaved",
    "decode_steps", "decode_tokens", "cancelled", "errors", "restarts", "kv_waits", "kv_cuts",
    "prefix_queries", "prefix_query_tokens", "prefix_hit_tokens", "prefix_inserted_blocks", "prefix_evicted_blocks",
})


class BackendStats:
    """Each backend's own numeric stats (``backend.stats()``) with the label ``backend=alias``, read at scrape time:
    the embedded engine's batch, KV cache and prefix-cache figures. Those that only grow (:data:`COUNTER_STATS`) are
    counters, ``archon_backend_<name>_total`` (``archon_backend_requests_total``, ``..._prefix_hit_tokens_total``);
    the rest gauges, ``archon_backend_<name>`` (``archon_backend_prefix_hit_rate``, ``..._active_sequences``)."""

    def __init__(self, backends: Callable[[], Mapping[str, Any]]):
        self.backends = backends

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for alias, backend in self.backends().items():
            for key, value in numeric_stats(backend).items():
                fam = families.get(key)
                if fam is None:
                    if key in COUNTER_STATS:
                        fam = CounterMetricFamily(f"archon_backend_{key}", f"backend counter {key} (since the backend started)", labels=["backend"])
                    else:
                        fam = GaugeMetricFamily(f"archon_backend_{key}", f"backend stat {key}", labels=["backend"])
                    families[key] = fam
                fam.add_metric([alias], float(value))
        yield from families.values()


def _forget_dead_workers(path: str) -> None:
    """Drop the live-only gauges (in-flight requests) of worker processes that died: uvicorn restarts a crashed
    worker under a new pid, and the old one's files would keep its last in-flight count in the sum for good
    (prometheus_client leaves calling ``mark_process_dead`` to the server)."""
    from prometheus_client import multiprocess

    for name in os.listdir(path):
        if not name.startswith("gauge_live"):
            continue
        try:
            pid = int(name.rsplit("_", 1)[1].split(".")[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)
        except PermissionError:
            pass  # alive, someone else's


class Metrics:
    def __init__(self, backends: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.backend_stats = BackendStats(backends) if backends is not None else None
        if self.backend_stats is not None:
            self.registry.register(self.backend_stats)
        self.requests = Counter("archon_requests_total", "Generation requests (chat completions, completions, responses) answered, "
                                "by model and HTTP status; those refused before they ran (at the edge: a bad key, a body too "
                                "large, over the limits; a 400 on a field, an unknown model) with model=\"\"", ["model", "status"],
                                registry=self.registry)
        self.latency = Histogram(
            "archon_request_latency_seconds", "End-to-end request latency", ["model"], registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.inflight = Gauge("archon_requests_in_flight", "Requests being served", registry=self.registry,
                              multiprocess_mode="livesum")
        self.backend_calls = Counter("archon_backend_calls_total", "Backend calls", ["model", "outcome"], registry=self.registry)
        self.tokens = Counter("archon_tokens_total", "Tokens over all sub-calls", ["kind"], registry=self.registry)
        self.rejected = Counter("archon_rejected_total", "Requests of any route refused at the edge or on admission, by reason: auth, "
                                "body_size, concurrency, body_bytes, invalid_text", ["reason"], registry=self.registry)
        # Label children, looked up once per label values: ``labels()`` takes a lock and builds a key each time, six
        # times per self-moa request (~5 us of its server CPU, issue 20). Bounded as prometheus' own children are.
        self._finished: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._calls: dict[tuple[str, bool], Any] = {}
        self._refused: dict[tuple[int, str | None, bool], tuple[Any, ...]] = {}
        self._prompt_tokens = self.tokens.labels("prompt")
        self._completion_tokens = self.tokens.labels("completion")

    def request_done(self, model: str, status: int, seconds: float, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """One request answered (or failed): its count by status, its latency, the tokens of all its calls."""
        children = self._finished.get((model, status))
        if children is None:
            children = self._finished[(model, status)] = (self.requests.labels(model, str(status)), self.latency.labels(model))
        children[0].inc()
        children[1].observe(seconds)
        if prompt_tokens:
            self._prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            self._completion_tokens.inc(completion_tokens)

    def refused(self, status: int, reason: str | None = None, generation: bool = True) -> None:
        """A request answered with an error before it ran: the one place such answers are counted. A generation request
        (``generation``: chat completions, completions, responses) in ``archon_requests_total`` by status, with no
        model (the request's may be any string, or not read yet) and no latency. With ``reason``, a refusal by the
        edge (api/edge.py: ``auth`` 401, ``body_size`` 413, ``concurrency`` and ``body_bytes`` 429, ``invalid_text``
        400) or on admission (``concurrency``), of any route, also in ``archon_rejected_total``."""
        children = self._refused.get((status, reason, generation))
        if children is None:  # looked up once (see _finished): an overload's 429s come by the thousand
            children = self._refused[(status, reason, generation)] = (
                *((self.rejected.labels(reason),) if reason is not None else ()),
                *((self.requests.labels("", str(status)),) if generation else ()),
            )
        for child in children:
            child.inc()

    def backend_call(self, model: str, ok: bool, requests: int = 1) -> None:
        child = self._calls.get((model, ok))
        if child is None:
            child = self._calls[(model, ok)] = self.backend_calls.labels(model, "ok" if ok else "error")
        child.inc(requests)

    def exposition(self) -> bytes:
        """What ``/metrics`` answers: this app's registry, or in multiprocess mode (``--workers``) every worker's
        values summed, plus the backends' own counters (the same in every worker: the one backend host's)."""
        if not os.environ.get(MULTIPROC_ENV):
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        _forget_dead_workers(os.environ[MULTIPROC_ENV])
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        if self.backend_stats is not None:
            registry.register(self.backend_stats)
        return generate_latest(registry)
