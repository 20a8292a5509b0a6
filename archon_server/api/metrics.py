"""Prometheus metrics (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..backends.base import numeric_stats


class BackendStats:
    """Each backend's own numeric counters (``backend.stats()``) as ``archon_backend_<name>{backend=alias}``,
    read at scrape time: the embedded engine's batch, KV cache and prefix-cache figures
    (``archon_backend_prefix_hit_rate``, ``..._prefix_hit_tokens``, ``..._prefix_bytes``, ...)."""

    def __init__(self, backends: Callable[[], Mapping[str, Any]]):
        self.backends = backends

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for alias, backend in self.backends().items():
            for key, value in numeric_stats(backend).items():
                fam = families.get(key)
                if fam is None:
                    fam = families[key] = GaugeMetricFamily(f"archon_backend_{key}", f"backend stat {key}", labels=["backend"])
                fam.add_metric([alias], float(value))
        yield from families.values()


class Metrics:
    def __init__(self, backends: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry()
        if backends is not None:
            self.registry.register(BackendStats(backends))
        self.requests = Counter("archon_requests_total", "Chat completion requests", ["model", "status"], registry=self.registry)
        self.latency = Histogram(
            "archon_request_latency_seconds", "End-to-end request latency", ["model"], registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.inflight = Gauge("archon_requests_in_flight", "Requests being served", registry=self.registry)
        self.backend_calls = Counter("archon_backend_calls_total", "Backend calls", ["model", "outcome"], registry=self.registry)
        self.tokens = Counter("archon_tokens_total", "Tokens over all sub-calls", ["kind"], registry=self.registry)
        self.rejected = Counter("archon_rejected_total", "Requests rejected before running", ["reason"], registry=self.registry)
