"""The server's edge: what every HTTP request passes before a route sees it.

Plain ASGI (not a FastAPI dependency) so that it runs for every route, before any body is parsed:

* auth (401) and the in-flight request cap (429, before a byte of body is read);
* the body: at most ``max_body`` bytes (413), and all bodies in flight together at most ``max_inflight_bytes``
  (429 at once, before reading when Content-Length says so). The request count alone does not bound memory: 40
  requests of 3.9 MB each are "only" 40 requests, but every copy of a body the server makes (the raw bytes, the
  parsed strings, the upstream request) is paid 40 times;
* text that cannot go upstream: a lone UTF-16 surrogate (``"\\ud800"``, valid JSON, not valid Unicode: it cannot
  be encoded as UTF-8, so the upstream call fails and the client got a 502) or a NUL character, anywhere in the
  body, is a 400 naming the field, before any backend call;
* the arrival time (a context variable, so every endpoint and the tasks it starts see it): the request deadline
  covers reading, parsing and prompt building too, not just the graph (see :func:`remaining_s`).

Every refusal here goes out through :meth:`GuardMiddleware._refuse`, which tells ``on_reject`` (the app counts it in
/metrics: api/metrics.py ``Metrics.refused``) and answers in OpenAI's error schema.

The access log writes the request line; :class:`AccessLogRedactor` blanks query-string values there, so a key sent
as ``?api_key=...`` (refused with 401) does not end up in the log.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import check_key
from .errors import error_body

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# What makes a body worth the exact check: a NUL escape, any surrogate escape (pairs too: json.dumps writes emoji
# as pairs, and telling a pair from a lone half is the exact check's job), or raw UTF-8-encoded surrogate bytes
# (json.loads decodes bytes with surrogatepass). Both patterns start with a literal, so the regex engine skips ahead
# with a fast search: ~1 ms for 4 MB of ASCII (an alternation with lookarounds, tried first, took 260 ms).
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
_SUSPECT_RAW = re.compile(rb"\xed[\xa0-\xbf]")


def _bad_char(s: str) -> int | None:
    """Index of the first NUL or lone surrogate in ``s``, or None; at C speed (a regex over 4 MB took 45 ms)."""
    first = s.find("\x00")
    if not s.isascii():  # isascii is O(1) in CPython; only non-ASCII text can hold a surrogate
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            first = e.start if first < 0 else min(first, e.start)
    return None if first < 0 else first


def find_invalid_text(body: bytes) -> tuple[str, str] | None:
    """``(param, message)`` for the first string (value or key) in a JSON body holding a NUL or a lone surrogate.

    None when there is none, or when the body is not JSON at all (the route reports that)."""
    if not _SUSPECT_ESCAPE.search(body) and not _SUSPECT_RAW.search(body):
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth: the route answers 400
        return None
    return _walk(doc, ())


def _walk(obj: Any, loc: tuple[Any, ...]) -> tuple[str, str] | None:
    # Iterative: the body may nest deeper than Python's recursion limit allows (the route rejects that later).
    stack: list[tuple[Any, tuple[Any, ...]]] = [(obj, loc)]
    while stack:
        cur, where = stack.pop()
        if isinstance(cur, str):
            at = _bad_char(cur)
            if at is not None:
                ch = cur[at]
                what = "a NUL character" if ch == "\x00" else f"a lone UTF-16 surrogate (\\u{ord(ch):04x}), which is not valid Unicode"
                param = _json_path(where)
                return param, f"{param}: contains {what} at character {at}"
        elif isinstance(cur, dict):
            for k, v in reversed(list(cur.items())):
                stack.append((v, (*where, k)))
                stack.append((k, where))  # a key is checked as a string at its parent's location
        elif isinstance(cur, list):
            stack.extend((v, (*where, i)) for i, v in reversed(list(enumerate(cur))))
    return None


def _json_path(loc: tuple[Any, ...]) -> str:
    """``messages[1].content``: where a value sits in the body as sent (spec.format_loc drops component type
    names, which are ordinary keys here)."""
    out = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return out or "<root>"


_ARRIVED: ContextVar[float | None] = ContextVar("archon_request_arrived", default=None)


def remaining_s(timeout_s: float) -> float:
    """Seconds left of a ``timeout_s`` deadline that started when the current request reached the edge (all of
    ``timeout_s`` outside a request)."""
    arrived = _ARRIVED.get()
    return timeout_s if arrived is None else timeout_s - (time.monotonic() - arrived)


def deadline_s(timeout_s: float) -> float:
    """The time a request's run may take: what is left of its ``timeout_s`` (at least 1 ms, so that a timeout scope
    around the run answers 504 rather than never starting). Graph runs (ChatService.run_graph) and the raw
    completions of a backend alias (api/completions) both run under it."""
    return max(remaining_s(timeout_s), 1e-3)


async def send_error(send: Send, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
    body = json.dumps(error_body(status, message, param=param, code=code)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyBudget:
    """Bytes of request bodies held by requests in flight; a request holds its share until its response is sent."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class GuardMiddleware:
    """Auth, the in-flight cap, the body limits, the text check and the arrival stamp (see the module docstring)."""

    def __init__(self, app: ASGIApp, keys: list[bytes], max_body: int, busy: Callable[[], bool] | None = None,
                 busy_paths: frozenset[str] = frozenset({"/v1/chat/completions"}), public: Callable[[str], bool] = lambda p: p == "/health",
                 budget: BodyBudget | None = None, on_reject: Callable[[str, int, str], None] | None = None):
        self.app = app
        self.keys = keys
        self.max_body = max_body
        self.busy = busy
        self.busy_paths = busy_paths  # where the in-flight cap applies (the generation endpoints)
        self.public = public  # paths that need no key
        self.budget = budget
        self.on_reject = on_reject or (lambda _path, _status, _reason: None)  # (path, HTTP status, reason)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = _ARRIVED.set(time.monotonic())
        try:
            await self._guard(scope, receive, send)
        finally:
            _ARRIVED.reset(arrived)

    async def _guard(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The two headers read here, picked from the list as sent: ASGI servers give header names lowercased (the
        # spec's rule), so no dict of every header decoded is built per request.
        auth = length = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                length = v.decode("latin-1")
            elif k == b"authorization":
                auth = v.decode("latin-1")
        path = scope.get("path", "")
        if self.keys and not self.public(path) and not check_key(auth, self.keys):
            await self._refuse(send, path, 401, "auth", "Incorrect or missing API key (Authorization: Bearer <key>).", "invalid_api_key")
            return
        if self.busy is not None and scope.get("method") == "POST" and path in self.busy_paths and self.busy():
            # Refuse before reading or parsing the body: under overload a 429 must cost next to nothing, or the
            # rejected clients' retries eat the CPU the admitted requests need (ChatService re-checks on admission).
            await self._refuse(send, path, 429, "concurrency", "server busy: too many requests in flight; retry later", "rate_limit_exceeded")
            return
        declared = int(length) if length is not None and length.isdigit() else None
        if declared is not None and declared > self.max_body:
            await self._too_large(send, path)
            return
        if scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        held = 0
        try:
            if declared is not None and self.budget is not None:
                if not self.budget.take(declared):
                    await self._over_budget(send, path)
                    return
                held = declared
            chunks: list[bytes] = []
            seen = 0
            while True:
                msg = await receive()
                if msg["type"] != "http.request":  # the client left while sending
                    return
                chunk = msg.get("body", b"")
                chunks.append(chunk)
                seen += len(chunk)
                if seen > self.max_body:
                    await self._too_large(send, path)
                    return
                if seen > held and self.budget is not None:  # no (or a lying) Content-Length: count as it comes
                    if not self.budget.take(seen - held):
                        await self._over_budget(send, path)
                        return
                    held = seen
                if not msg.get("more_body", False):
                    break
            raw = b"".join(chunks)  # one bytes object, which Starlette's Request.body() then keeps as it is
            chunks.clear()
            bad = find_invalid_text(raw)
            if bad is not None:
                param, message = bad
                await self._refuse(send, path, 400, "invalid_text", message, "invalid_value", param)
                return
            replay = _replay(raw, receive)
            del raw  # the app holds the body from here on, and lets go of it when it likes
            await self.app(scope, replay, send)
        finally:
            if held and self.budget is not None:
                self.budget.give(held)

    async def _refuse(self, send: Send, path: str, status: int, reason: str, message: str, code: str, param: str | None = None) -> None:
        """Every refusal at the edge: counted (``on_reject(path, status, reason)``), then answered."""
        self.on_reject(path, status, reason)
        await send_error(send, status, message, code, param)

    async def _too_large(self, send: Send, path: str) -> None:
        await self._refuse(send, path, 413, "body_size", f"request body larger than {self.max_body} bytes", "request_too_large")

    async def _over_budget(self, send: Send, path: str) -> None:
        await self._refuse(send, path, 429, "body_bytes", "server busy: too many request bytes in flight; retry later", "rate_limit_exceeded")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the whole body once (and forgets it), then passes on the server's messages."""
    box: list[bytes] = [body]

    async def replay() -> Message:
        if box:
            return {"type": "http.request", "body": box.pop(), "more_body": False}
        return await receive()

    return replay


class AccessLogRedactor(logging.Filter):
    """Blank query-string values in uvicorn's access log lines (``?api_key=***``): a key sent in the URL is refused,
    but the request line is logged as sent. Names stay, so the log still says what was asked."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-\[\]]{0,31}")


def redact_query(path_qs: str) -> str:
    """``/v1/models?api_key=sk-1&x`` -> ``/v1/models?api_key=***&***``: every value goes, and so does any "name"
    that is not a plain short parameter name (``?sk-...`` alone is a key, not a name)."""
    path, _, qs = path_qs.partition("?")
    parts = []
    for item in qs.split("&"):
        name, eq, _value = item.partition("=")
        parts.append(f"{name}=***" if eq and _PARAM_NAME.fullmatch(name) else "***")
    return path + "?" + "&".join(parts)


def redact_access_log(logger_name: str = "uvicorn.access") -> None:
    """Install :class:`AccessLogRedactor` on the access logger (once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, AccessLogRedactor) for f in logger.filters):
        logger.addFilter(AccessLogRedactor())
