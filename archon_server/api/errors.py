"""OpenAI's error schema for every error our server returns."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..exceptions import ArchonError
from ..spec import format_loc

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "server_error",
    504: "timeout_error",
}


# A failure's OpenAI error `code` by its HTTP status: the one map, for JSON answers and stream error events alike.
FAILURE_CODES = {400: "invalid_value", 404: "model_not_found", 422: "invalid_value", 429: "rate_limit_exceeded",
                 499: "client_disconnected", 502: "upstream_error", 503: "unavailable", 504: "timeout"}


def failure_code(status: int) -> str | None:
    return FAILURE_CODES.get(status)


# How OpenAI (and vLLM, the embedded engine: exceptions.ContextOverflow) begin a prompt-past-the-context refusal.
CONTEXT_LENGTH = "This model's maximum context length is"


def failure(status: int, message: str) -> APIError:
    """A failed run's error: OpenAI's ``param: messages, code: context_length_exceeded`` for a prompt (and
    max_tokens) past the context, whoever said it (the engine, or an upstream's 400 passed on); else the code
    of its status."""
    if status == 400 and CONTEXT_LENGTH in message:
        return APIError(400, message, param="messages", code="context_length_exceeded")
    return APIError(status, message, code=failure_code(status))


class APIError(ArchonError):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.observed = False  # counted in /metrics where it happened (a request that ran): not again as a refusal


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def sse_error(err: APIError) -> str:
    """How a chat or completions stream ends on an error: the error in this schema as a `data:` event, then [DONE]."""
    return f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\ndata: [DONE]\n\n"


def error_response(status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


async def api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code)


async def validation_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
    loc = tuple(x for x in first.get("loc", ()) if x != "body")
    param = format_loc(loc) if loc else None
    msg = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        msg, param = "request body is not valid JSON", None
    elif param:
        msg = f"{param}: {msg}"
    if len(errs) > 1:
        msg += f" (and {len(errs) - 1} more error(s))"
    return error_response(400, msg, param, "invalid_value")


async def http_error_handler(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def unhandled_handler(_: Request, exc: Exception) -> JSONResponse:
    # Never leak internals (or secrets inside exception text) to the client.
    return error_response(500, "internal server error", code="internal_error")
