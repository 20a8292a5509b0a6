"""/v1/embeddings is not served: ensembles of generators have no embedding to offer. A 404 in OpenAI's error
schema that says what is served, so a client configured for a full OpenAI endpoint learns why at once."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..errors import APIError, error_body

router = APIRouter()


@router.post("/v1/embeddings", responses={404: {"description": "not served", "content": {"application/json": {"example": error_body(404, "not served")}}}})
async def embeddings(request: Request) -> None:
    served = [card.id for card in request.app.state.chat.catalog.list_models()]
    raise APIError(404, "This server does not serve embeddings (/v1/embeddings). It serves text generation: "
                   "/v1/chat/completions, /v1/responses and /v1/completions, for the models: " + ", ".join(served),
                   param="model", code="embeddings_not_served")
