"""The last N requests' traces, in memory (``server.keep_traces``; 0 keeps none), for the console and /v1/traces.

Bounded by count, oldest dropped first. Only this process's requests; nothing is written to disk.

A request's :class:`Trace` is kept as the object and made into JSON-ready dicts only when someone reads it (the
console, ``GET /v1/traces``): serializing every request's trace up front was a visible share of the server's CPU per
request, for traces that are mostly never read. A finished trace is not changed afterwards, so reading it later gives
what it would have given then.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from ...components.trace import Trace

# A kept request's messages are for showing what was asked, not for replay: cut long ones.
MAX_MESSAGE_CHARS = 20_000


class TraceStore:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def add(self, entry: dict[str, Any]) -> None:
        """Keep one finished request: ``id``, ``model``, ``status``, ``messages``, ``answers``, ``trace``..."""
        if not self.enabled:
            return
        entry.setdefault("created", int(time.time()))
        self._items[entry["id"]] = entry
        self._items.move_to_end(entry["id"])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, trace_id: str) -> dict[str, Any] | None:
        e = self._items.get(trace_id)
        if e is not None:
            _materialize(e)
        return e

    def summaries(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first, without the bulky parts (trace, messages): what a list shows."""
        out = []
        for e in reversed(self._items.values()):
            tr = _materialize(e).get("trace") or {}
            out.append({
                "id": e["id"], "created": e["created"], "model": e["model"], "status": e["status"],
                "http_status": e.get("http_status"), "stream": e.get("stream", False), "prompt": e.get("prompt", "")[:200],
                "latency_s": tr.get("latency_s"), "calls": tr.get("calls"),
                "total_tokens": (tr.get("usage") or {}).get("total_tokens"), "error": e.get("error"),
            })
            if limit is not None and len(out) >= limit:
                break
        return out


def _materialize(e: dict[str, Any]) -> dict[str, Any]:
    """The entry with its trace as JSON-ready dicts (made once, on the first read)."""
    if isinstance(e.get("trace"), Trace):
        e["trace"] = e["trace"].to_dict()
    return e


def entry(trace_id: str, model: str, messages: list[dict[str, Any]], *, status: int, stream: bool,
          trace: Trace | dict[str, Any] | None, answers: list[str] | None = None, error: str | None = None) -> dict[str, Any]:
    """The record the store keeps for one request (JSON-ready once read from the store: the console downloads it as
    is). ``trace``: the finished request's Trace (made into dicts when first read), or its dicts."""
    msgs = [{"role": m.get("role", ""), "content": str(m.get("content") or "")[:MAX_MESSAGE_CHARS]} for m in messages]
    prompt = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), msgs[-1]["content"] if msgs else "")
    return {"id": trace_id, "object": "trace", "created": int(time.time()), "model": model,
            "status": "ok" if status == 200 else "error", "http_status": status, "stream": stream,
            "prompt": prompt, "messages": msgs, "answers": answers or [], "error": error, "trace": trace}
