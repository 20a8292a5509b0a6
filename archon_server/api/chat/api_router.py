"""Thin routes for /v1/chat/completions."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..errors import error_body
from ..json_route import JSONBodyRoute
from ..streaming import EventStreamResponse
from .protocol import ChatCompletionRequest, ChatCompletionResponse

router = APIRouter(route_class=JSONBodyRoute)

_ERRORS = {s: {"description": d, "content": {"application/json": {"example": error_body(s, d)}}} for s, d in [
    (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"), (413, "request too large"),
    (429, "too many requests in flight"), (502, "backends failed"), (504, "deadline exceeded"),
]}


# 200 is JSON, or Server-Sent Events with `stream: true`: both documented, so schema-driven clients agree.
_STREAM = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "description": "one event: `data:` a chat.completion.chunk as JSON (or an error), last `data: [DONE]`",
    "properties": {"data": {"type": "string"}}, "required": ["data"]}}}}}


async def answer(service: Any, body: Any, request: Request) -> Response:
    """JSON, or with `stream: true` Server-Sent Events (chat, responses and completions answer alike)."""
    if body.stream:
        return EventStreamResponse(await service.create_stream(body, request))
    return json_response(await service.create(body, request))


def json_response(obj: Any) -> Response:
    """The JSON body orjson writes (a fraction of json.dumps' CPU per answer; same compact separators, UTF-8 as is);
    what orjson refuses (a lone surrogate, an int past 64 bits) goes through Starlette's JSONResponse as before."""
    try:
        return Response(orjson.dumps(obj), media_type="application/json")
    except TypeError:
        return JSONResponse(obj)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**_STREAM, **_ERRORS})
async def create_chat_completion(body: ChatCompletionRequest, request: Request):  # type: ignore[no-untyped-def]
    return await answer(request.app.state.chat, body, request)
