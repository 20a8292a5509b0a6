"""GET /v1/models: the architectures and the backends' own models (served straight through)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    now = int(time.time())
    data = []
    for card in request.app.state.catalog.list_models():
        entry = {"id": card.id, "object": "model", "created": now, "owned_by": "archon"}
        if card.kind == "architecture":
            entry["description"] = card.description
        data.append({**entry, "kind": card.kind})
    return {"object": "list", "data": data}
