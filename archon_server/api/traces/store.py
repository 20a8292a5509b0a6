"""The last N requests' traces, in memory (``server.keep_traces``; 0 keeps none), for the console and /v1/traces.

Bounded by count, oldest dropped first. Only this process's requests; nothing is written to disk.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

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
        return self._items.get(trace_id)

    def summaries(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first, without the bulky parts (trace, messages): what a list shows."""
        out = []
        for e in reversed(self._items.values()):
            tr = e.get("trace") or {}
            out.append({
                "id": e["id"], "created": e["created"], "model": e["model"], "status": e["status"],
                "http_status": e.get("http_status"), "stream": e.get("stream", False), "prompt": e.get("prompt", "")[:200],
                "latency_s": tr.get("latency_s"), "calls": tr.get("calls"),
                "total_tokens": (tr.get("usage") or {}).get("total_tokens"), "error": e.get("error"),
            })
            if limit is not None and len(out) >= limit:
                break
        return out


def entry(trace_id: str, model: str, messages: list[dict[str, Any]], *, status: int, stream: bool,
          trace: dict[str, Any] | None, answers: list[str] | None = None, error: str | None = None) -> dict[str, Any]:
    """The record the store keeps for one request (JSON-ready: the console downloads it as is)."""
    msgs = [{"role": m.get("role", ""), "content": str(m.get("content") or "")[:MAX_MESSAGE_CHARS]} for m in messages]
    prompt = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), msgs[-1]["content"] if msgs else "")
    return {"id": trace_id, "object": "trace", "created": int(time.time()), "model": model,
            "status": "ok" if status == 200 else "error", "http_status": status, "stream": stream,
            "prompt": prompt, "messages": msgs, "answers": answers or [], "error": error, "trace": trace}
