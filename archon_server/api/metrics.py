"""Prometheus metrics (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("archon_requests_total", "Chat completion requests", ["model", "status"], registry=self.registry)
        self.latency = Histogram(
            "archon_request_latency_seconds", "End-to-end request latency", ["model"], registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.inflight = Gauge("archon_requests_in_flight", "Requests being served", registry=self.registry)
        self.backend_calls = Counter("archon_backend_calls_total", "Backend calls", ["model", "outcome"], registry=self.registry)
        self.tokens = Counter("archon_tokens_total", "Tokens over all sub-calls", ["kind"], registry=self.registry)
        self.rejected = Counter("archon_rejected_total", "Requests rejected before running", ["reason"], registry=self.registry)
