"""Content-addressed cache of backend calls, so a re-run of a sweep re-uses its generations.

``CachingBackend(inner, store)`` implements the Backend interface.  The key is a SHA-256
of the canonical JSON of (model, messages, sampling params) *plus an occurrence index*:
with temperature > 0 the same request sent k times (k samples of a generator) must give
k different answers, so the i-th identical request within a *scope* maps to entry i.  A
scope is set per benchmark question by the sweep (:func:`cache_scope`), which makes a
re-run of that question replay exactly the same sequence; outside any scope one
process-wide scope is used.  Failures are never cached.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..backends.base import Backend, BackendWrapper, ChatRequest, ChatResult, Choice, StreamChunk, TokenLogprob, Usage


class CacheStore:
    """A small SQLite key → JSON store, safe to share between threads and processes (WAL)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)")

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM calls WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO calls (key, value, created) VALUES (?, ?, ?)",
                             (key, json.dumps(value, ensure_ascii=False), time.time()))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def request_key(request: ChatRequest) -> str:
    payload = {"model": request.model, "messages": request.messages, "params": asdict(request.params)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def result_to_json(res: ChatResult) -> dict[str, Any]:
    return asdict(res)


def result_from_json(d: dict[str, Any]) -> ChatResult:
    choices = []
    for c in d.get("choices", []):
        lps = c.get("logprobs")
        logprobs = None
        if lps is not None:
            logprobs = [TokenLogprob(t["token"], t["logprob"], None if t.get("top") is None else [(a, b) for a, b in t["top"]],
                                     t.get("bytes"), t.get("top_bytes")) for t in lps]
        choices.append(Choice(c["text"], c.get("finish_reason", "stop"), c.get("index", 0), logprobs))
    u = d.get("usage") or {}
    return ChatResult(choices, Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0)), d.get("model", ""),
                      d.get("latency_s", 0.0), d.get("requests", 1), dict(d.get("metrics") or {}))


class _Scope:
    def __init__(self, name: str):
        self.name = name
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def next_index(self, key: str) -> int:
        with self.lock:
            i = self.counts.get(key, 0)
            self.counts[key] = i + 1
            return i


# Set by a consumer that closes a stream on purpose (a judge at its verdict, bench.judges.chat_until):
# the cache then keeps what was read, since a replay cuts at the same place.  Any other early close
# (an error, a cancellation) leaves nothing cached.
STREAM_CUT: contextvars.ContextVar[bool] = contextvars.ContextVar("archon_stream_cut", default=False)

_GLOBAL_SCOPE = _Scope("")
_scope: contextvars.ContextVar[_Scope] = contextvars.ContextVar("archon_cache_scope", default=_GLOBAL_SCOPE)


@contextlib.contextmanager
def cache_scope(name: str) -> Iterator[None]:
    """Occurrence counting restarts inside; asyncio tasks created inside inherit the scope."""
    token = _scope.set(_Scope(name))
    try:
        yield
    finally:
        _scope.reset(token)


class CachingBackend(BackendWrapper):
    """Chat calls answered from the store when this scope asked the same before; everything else goes to ``inner``.
    A stream is served from :meth:`chat` (one chunk, :meth:`Backend.stream`), so it is cached too."""

    def __init__(self, inner: Backend, store: CacheStore, *, namespace: str = ""):
        super().__init__(inner)
        self.store = store
        self.namespace = namespace
        self.hits = 0
        self.misses = 0

    def key(self, request: ChatRequest) -> str:
        scope = _scope.get()
        base = request_key(request)
        idx = scope.next_index(base)
        return hashlib.sha256(f"{self.namespace}\x00{scope.name}\x00{base}\x00{idx}".encode()).hexdigest()

    async def chat(self, request: ChatRequest) -> ChatResult:
        key = self.key(request)
        hit = self.store.get(key)
        if hit is not None:
            self.hits += 1
            res = result_from_json(hit)
            res.metrics = {**res.metrics, "cache_hit": True}
            return res
        self.misses += 1
        res = await self.inner.chat(request)  # errors propagate and are not stored
        self.store.put(key, result_to_json(res))
        return res

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        """A hit replays as chunks; a miss streams through and is stored when it ran to its end or was cut
        on purpose (:data:`STREAM_CUT`)."""
        key = self.key(request)
        hit = self.store.get(key)
        if hit is not None:
            self.hits += 1
            res = result_from_json(hit)
            for ch in res.choices:
                yield StreamChunk(index=ch.index, text=ch.text)
            for ch in res.choices:
                yield StreamChunk(index=ch.index, finish_reason=ch.finish_reason)
            yield StreamChunk(usage=res.usage, metrics={**res.metrics, "cache_hit": True})
            return
        self.misses += 1
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        usage, metrics = Usage(), {}
        async with contextlib.aclosing(self.inner.stream(request)) as chunks:
            async for ch in chunks:
                texts[ch.index] = texts.get(ch.index, "") + ch.text
                if ch.finish_reason:
                    reasons[ch.index] = ch.finish_reason
                if ch.usage is not None:
                    usage = ch.usage
                if ch.metrics:
                    metrics = dict(ch.metrics)
                try:
                    yield ch
                except GeneratorExit:
                    if STREAM_CUT.get():
                        self._put_stream(key, request, texts, reasons, usage, {**metrics, "stopped_at_verdict": True})
                    raise
        self._put_stream(key, request, texts, reasons, usage, metrics)

    def _put_stream(self, key: str, request: ChatRequest, texts: dict[int, str], reasons: dict[int, str],
                    usage: Usage, metrics: dict[str, Any]) -> None:
        choices = [Choice(texts[i], reasons.get(i, "stop"), i) for i in sorted(texts)]
        self.store.put(key, result_to_json(ChatResult(choices, usage, request.model, metrics=metrics)))

