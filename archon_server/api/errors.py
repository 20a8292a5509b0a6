"""OpenAI's error schema for every error our server returns."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..backends.base import SAMPLING_EXTRAS
from ..exceptions import ArchonError
from ..spec import error_message, format_loc, is_union_tag

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


@dataclass(frozen=True)
class PromptFields:
    """How an endpoint names what a context-length refusal is about: ``prompt`` the field that holds the prompt (the
    refusal's ``param``, and its word in the message), ``max_tokens`` the field of the completion's length (the
    ``param`` when the prompt fits but the explicit length with it does not)."""

    prompt: str
    max_tokens: str


# Chat: OpenAI's param and words ("messages") for both refusals.
CHAT_FIELDS = PromptFields("messages", "messages")
COMPLETIONS_FIELDS = PromptFields("prompt", "max_tokens")
RESPONSES_FIELDS = PromptFields("input", "max_output_tokens")

# The words of exceptions.ContextOverflow's message (vLLM's and OpenAI's chat wording) that name the prompt.
_PROMPT_WORDS = re.compile(r"\b(your|the) messages\b")
# An overflow by the completion's length: ContextOverflow's "(N in the messages, M in the completion)", vLLM's
# "'max_tokens' or 'max_completion_tokens' is too large".
_BY_MAX_TOKENS = re.compile(r"in the completion\)|max_tokens|max_completion_tokens")


# A backend's refusal of one of the client's fields says so first (the engine's ``logit_bias: token id(s) [...] out of
# the vocabulary``, its ``response_format: cannot constrain decoding to it``), also inside an architecture's
# ``layer 0 failed: generator0: ...``: the 400 names that field as its param.
_NAMED_FIELD = re.compile(r"(?:^|: )(" + "|".join((*SAMPLING_EXTRAS, "response_format")) + r"): ")


def failure(status: int, message: str, fields: PromptFields = CHAT_FIELDS) -> APIError:
    """A failed run's error: OpenAI's ``code: context_length_exceeded`` for a prompt (and max_tokens) past the context,
    whoever said it (the engine, or an upstream's 400 passed on), its ``param`` the endpoint's field (``fields``: the
    prompt's, or the max_tokens' when that is what overflowed) and the message naming the endpoint's prompt field;
    else the code of its status, and a 400 that begins with one of the client's fields (:data:`_NAMED_FIELD`) names it."""
    if status == 400 and CONTEXT_LENGTH in message:
        param = fields.max_tokens if _BY_MAX_TOKENS.search(message) else fields.prompt
        if fields.prompt != "messages":
            message = _PROMPT_WORDS.sub(lambda m: f"{m.group(1)} {fields.prompt}", message)
        return APIError(400, message, param=param, code="context_length_exceeded")
    named = _NAMED_FIELD.search(message) if status == 400 else None
    return APIError(status, message, param=named.group(1) if named else None, code=failure_code(status))


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


_PLACES = frozenset({"body", "query", "path", "header", "cookie"})


def _field_loc(error: Any) -> tuple[Any, ...]:
    """An error's location without FastAPI's part of the request before it: ``limit``, not ``query.limit``, as OpenAI
    names a query parameter in ``param`` as it names a body field."""
    loc = tuple(error.get("loc", ()))
    return loc[1:] if loc and loc[0] in _PLACES else loc


def _first_error(errs: list[Any]) -> tuple[tuple[Any, ...], str, int]:
    """The location and message of the request's first error, and how many errors it stands for.

    A value that fits no branch of a union (``stop: 5``, ``content: 5``) has one error per branch, each located under
    pydantic's name for the branch (``stop.str``, ``stop.list[str]``): they are one error of the field. The branch that
    got furthest says what is wrong (``stop: [5]``: ``stop[0]`` should be a string); when every branch failed at once,
    the message lists what the field may be (``Input should be a valid string or a valid list``)."""
    first = errs[0]
    loc = _field_loc(first)
    msg = error_message(first)
    at = next((i for i, x in enumerate(loc) if is_union_tag(x)), None)
    if at is None:
        return loc, msg, 1
    group = []
    for e in errs:
        el = _field_loc(e)
        if len(el) > at and el[:at] == loc[:at] and is_union_tag(el[at]):
            group.append((el, error_message(e)))
    deepest = max(group, key=lambda g: len(g[0]))
    if len(deepest[0]) > at + 1:  # a branch that took the value and failed inside it
        return deepest[0], deepest[1], len(group)
    prefix = "Input should be "
    wants = list(dict.fromkeys(m.removeprefix(prefix) for _, m in group))
    return loc, prefix + " or ".join(wants), len(group)


async def validation_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    if not errs:
        return error_response(400, "invalid request", None, "invalid_value")
    if errs[0].get("type") == "json_invalid":
        loc, msg, param, counted = (), "request body is not valid JSON", None, 1
    else:
        loc, msg, counted = _first_error(list(errs))
        param = format_loc(loc) if loc else None
    if param:
        msg = f"{param}: {msg}"
    if len(errs) > counted:
        msg += f" (and {len(errs) - counted} more error(s))"
    return error_response(400, msg, param, "invalid_value")


async def http_error_handler(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def unhandled_handler(_: Request, exc: Exception) -> JSONResponse:
    # Never leak internals (or secrets inside exception text) to the client.
    return error_response(500, "internal server error", code="internal_error")
