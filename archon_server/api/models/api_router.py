"""GET /v1/models (the architectures and the backends' own models, served straight through) and GET /v1/models/{id}."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from ...graph.catalog import ModelCard
from ..errors import APIError

router = APIRouter()


def _card(card: ModelCard, now: int) -> dict[str, Any]:
    entry = {"id": card.id, "object": "model", "created": now, "owned_by": "archon"}
    if card.kind == "architecture":
        entry["description"] = card.description
    return {**entry, "kind": card.kind}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    now = int(time.time())
    return {"object": "list", "data": [_card(card, now) for card in request.app.state.catalog.list_models()]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> dict:
    """One model as the list gives it (the SDK's ``client.models.retrieve``); ids may hold ``/`` (``org/name``)."""
    for card in request.app.state.catalog.list_models():
        if card.id == model:
            return _card(card, int(time.time()))
    raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
