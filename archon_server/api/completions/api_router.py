"""Thin routes for /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..chat.api_router import _ERRORS, answer
from ..json_route import JSONBodyRoute
from .protocol import CompletionRequest, CompletionResponse

router = APIRouter(route_class=JSONBodyRoute)

_STREAM = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "description": "one event: `data:` a text_completion chunk as JSON (or an error), last `data: [DONE]`",
    "properties": {"data": {"type": "string"}}, "required": ["data"]}}}}}


@router.post("/v1/completions", response_model=CompletionResponse, responses={**_STREAM, **_ERRORS})
async def create_completion(body: CompletionRequest, request: Request):  # type: ignore[no-untyped-def]
    return await answer(request.app.state.completions, body, request)
