"""Per-request trace: what every layer called, how long it took, what it cost."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..backends.base import Usage


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
    status: str = "ok"  # ok | error | timeout | cancelled: set from the exception's type (components.base.failure_status)


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


@dataclass
class Trace:
    architecture: str
    layers: list[LayerTrace] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    started: float = field(default_factory=time.perf_counter)
    latency_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return sum(c.requests for layer in self.layers for c in layer.calls)

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
            "layers": [
                {
                    **{k: v for k, v in asdict(layer).items() if k != "calls"},
                    "latency_s": round(layer.latency_s, 4),
                    "calls": [{**asdict(c), "latency_s": round(c.latency_s, 4)} for c in layer.calls],
                }
                for layer in self.layers
            ],
        }
