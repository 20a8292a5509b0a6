"""Thin routes for /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat.api_router import _ERRORS
from .protocol import CompletionRequest, CompletionResponse

router = APIRouter()

_STREAM = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "description": "one event: `data:` a text_completion chunk as JSON (or an error), last `data: [DONE]`",
    "properties": {"data": {"type": "string"}}, "required": ["data"]}}}}}


@router.post("/v1/completions", response_model=CompletionResponse, responses={**_STREAM, **_ERRORS})
async def create_completion(body: CompletionRequest, request: Request):  # type: ignore[no-untyped-def]
    service = request.app.state.completions
    if body.stream:
        gen = await service.create_stream(body)
        return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return JSONResponse(await service.create(body, request))
