"""GET /v1/models: the architectures and the backends' own models (served straight through)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = request.app.state
    now = int(time.time())
    data = [
        {"id": name, "object": "model", "created": now, "owned_by": "archon", "description": spec.description, "kind": "architecture"}
        for name, spec in sorted(state.chat.catalog.items())
    ]
    data += [
        {"id": alias, "object": "model", "created": now, "owned_by": "archon", "kind": "backend"}
        for alias in state.registry.aliases()
        if alias not in state.chat.catalog
    ]
    return {"object": "list", "data": data}
