"""Replicas of one upstream: which one gets the next attempt, what a failure does to it, how long to back off.

Kept apart from the transport (as httpx keeps its connection pool apart from its transport): the HTTP backend's one
retry loop asks the pool for a replica, tells it how the attempt went, and asks it how long to wait.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

log = logging.getLogger("archon.backends.pool")


@dataclass
class Replica:
    url: str
    outstanding: int = 0
    consecutive_failures: int = 0
    open_until: float = 0.0  # circuit open (skipped) until this monotonic time
    stats: dict[str, int] = field(default_factory=lambda: {"requests": 0, "failures": 0})

    def available(self, now: float) -> bool:
        return now >= self.open_until


class ReplicaPool:
    """Least-outstanding-requests routing, a circuit breaker per replica, full-jitter backoff honouring Retry-After."""

    def __init__(self, name: str, urls: list[str], *, breaker_failures: int = 5, breaker_cooldown_s: float = 10.0,
                 backoff_base_s: float = 0.25, backoff_max_s: float = 8.0):
        if not urls:
            raise ValueError(f"backend {name!r}: no base URL")
        self.name = name
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = breaker_cooldown_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s

    def pick(self) -> Replica:
        """Least outstanding requests among replicas whose breaker is closed (all open: least recently opened)."""
        now = time.monotonic()
        live = [r for r in self.replicas if r.available(now)]
        if not live:
            return min(self.replicas, key=lambda r: r.open_until)
        return min(live, key=lambda r: r.outstanding)

    def attempt(self) -> "_Attempt":
        """A picked replica, counted as outstanding while the attempt runs (``with pool.attempt() as replica``)."""
        return _Attempt(self.pick())

    def record(self, replica: Replica, ok: bool, error: BaseException | None = None) -> None:
        """A success closes the replica's breaker; ``breaker_failures`` failures in a row open it for the cool-down."""
        replica.stats["requests"] += 1
        if ok:
            replica.consecutive_failures = 0
            replica.open_until = 0.0
            return
        log.debug("backend %s replica %s: attempt failed: %s", self.name, replica.url, str(error) or type(error).__name__)
        replica.stats["failures"] += 1
        replica.consecutive_failures += 1
        if replica.consecutive_failures >= self.breaker_failures:
            replica.open_until = time.monotonic() + self.breaker_cooldown_s
            log.warning("backend %s replica %s: circuit open for %.0fs", self.name, replica.url, self.breaker_cooldown_s)

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry ``attempt + 1``: the upstream's Retry-After (capped), else full jitter (AWS
        architecture blog), which spreads the retries of many callers apart."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.backoff_max_s)
        return random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))


class _Attempt:
    """The context manager of :meth:`ReplicaPool.attempt`: a class, not ``@contextmanager``, whose generator and
    wrapper objects cost more than the counting they do, on every backend call."""

    __slots__ = ("replica",)

    def __init__(self, replica: Replica):
        self.replica = replica

    def __enter__(self) -> Replica:
        self.replica.outstanding += 1
        return self.replica

    def __exit__(self, *exc: object) -> None:
        self.replica.outstanding -= 1
