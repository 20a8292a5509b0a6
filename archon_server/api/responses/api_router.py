"""Thin routes for /v1/responses."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from ..chat.api_router import _ERRORS, answer
from ..json_route import JSONBodyRoute
from .protocol import ResponsesRequest

router = APIRouter(route_class=JSONBodyRoute)

# 200 is a Response object as JSON, or Server-Sent Events with `stream: true`: both documented.
_STREAM = {200: {"content": {
    "application/json": {"schema": {"type": "object", "description": "a Response object (`object: response`)"}},
    "text/event-stream": {"schema": {
        "type": "object", "description": "typed events (`event: response.output_text.delta`, `data:` JSON with `sequence_number`), last `response.completed`, `response.incomplete` (cut by max_output_tokens) or `response.failed`",
        "properties": {"data": {"type": "string"}}, "required": ["data"]}}}}}


@router.post("/v1/responses", responses={**_STREAM, **_ERRORS})
async def create_response(body: ResponsesRequest, request: Request):  # type: ignore[no-untyped-def]
    return await answer(request.app.state.responses, body, request)


@router.get("/v1/responses/{response_id}", responses={404: _ERRORS[404]})
async def retrieve_response(response_id: str, request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.responses.retrieve(response_id))


@router.delete("/v1/responses/{response_id}", responses={404: _ERRORS[404]})
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.responses.delete(response_id))


@router.get("/v1/responses/{response_id}/input_items", responses={400: _ERRORS[400], 404: _ERRORS[404]})
async def list_input_items(
    response_id: str, request: Request, after: str | None = None, limit: int = Query(default=20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc", include: list[str] | None = Query(default=None),  # noqa: ARG001 - OpenAI's; no includable field is stored
) -> JSONResponse:
    return JSONResponse(request.app.state.responses.input_items(response_id, after=after, limit=limit, order=order))
