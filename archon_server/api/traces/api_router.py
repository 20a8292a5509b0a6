"""GET /v1/traces (recent requests, newest first) and GET /v1/traces/{id} (one, with its full trace); with
``--workers N``, of all the workers (peers.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from ..errors import APIError

router = APIRouter()


@router.get("/v1/traces")
async def list_traces(request: Request, limit: int = Query(default=100, ge=1, le=10_000)) -> dict[str, Any]:
    store, peers = request.app.state.traces, request.app.state.trace_peers  # peers: the other --workers processes
    data = await peers.summaries(limit) if peers is not None else store.summaries(limit)
    return {"object": "list", "keep_traces": store.capacity, "data": data}


@router.get("/v1/traces/{trace_id}")
async def get_trace(trace_id: str, request: Request) -> dict[str, Any]:
    store, peers = request.app.state.traces, request.app.state.trace_peers
    item = await peers.get(trace_id) if peers is not None else store.get(trace_id)
    if item is None:
        why = "" if store.enabled else " (the server keeps no traces: server.keep_traces is 0)"
        raise APIError(404, f"no trace {trace_id!r}{why}", param="trace_id", code="not_found")
    return item
