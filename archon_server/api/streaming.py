"""Server-Sent Event answers that end properly when the server shuts down mid-stream.

On shutdown uvicorn gives in-flight requests a grace period (``timeout_graceful_shutdown``), then cancels their
tasks. A stream cut that way used to end with a dropped connection (the SDKs: "Connection error") and a traceback in
the log. The cancellation cannot be answered from inside the stream: Starlette runs the body in an anyio task group
whose cancelled scope cancels every later await in it. So the response object answers after the group has ended:
it sends the endpoint's own error ending (chat and completions: an error ``data:`` event and ``[DONE]``; responses:
``response.failed`` with the next sequence number) and closes the body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import APIError, failure_code

log = logging.getLogger("archon.api")


def data_event(chunk: BaseModel, null_usage: bool = False) -> str:
    """A chunk as an SSE ``data:`` event, None fields left out; ``null_usage`` (``stream_options.include_usage``):
    ``"usage": null`` on a chunk without usage, as OpenAI sends every chunk but the usage one (clients read the key)."""
    body = chunk.model_dump_json(exclude_none=True)
    if null_usage and getattr(chunk, "usage", None) is None:
        body = body[:-1] + ',"usage":null}'
    return f"data: {body}\n\n"


def shutdown_error() -> APIError:
    """What a request cut by the server's shutdown answers (a 503: the OpenAI SDKs retry it)."""
    return APIError(503, "the server is shutting down and this request did not finish; retry it", code=failure_code(503))


class EventStream:
    """An SSE body and how it ends on an error: ``ending(err)`` is the endpoint's last events for ``err``. A body whose
    ending depends on what it has sent so far (a sequence number) is given its stream and sets ``ending`` itself."""

    def __init__(self, ending: Callable[[APIError], str] = lambda _err: "") -> None:
        self.ending = ending
        self.body: AsyncIterator[str] | None = None

    def of(self, body: AsyncIterator[str]) -> EventStream:
        self.body = body
        return self


class EventStreamResponse(StreamingResponse):
    def __init__(self, stream: EventStream) -> None:
        assert stream.body is not None
        super().__init__(stream.body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.stream = stream

    async def stream_response(self, send: Send) -> None:
        # Starlette's first await here sends the response's start (which does not wait on the socket), so from
        # here on an ending may follow; a flag set once per stream, not a wrapper around every message's send.
        self.started = True
        await super().stream_response(send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.started = False
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            # A client that went away ends Starlette's task group without cancelling this task: a cancellation
            # reaching here came from outside, the server's shutdown.
            task = asyncio.current_task()
            if not self.started or task is None:
                raise
            task.uncancel()
            log.warning("server shutting down: a stream was cut before it finished")
            await send({"type": "http.response.body", "body": self.stream.ending(shutdown_error()).encode(), "more_body": False})
