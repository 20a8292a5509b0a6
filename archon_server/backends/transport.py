"""The HTTP/1.1 client under the OpenAI-compatible backend: keep-alive connections per backend, httptools' parser.

Why not aiohttp's client, which this replaced for upstream calls: py-spy on the server at 32 clients
(``benchmarks/overhead.py``, MoA's 13 calls per request) put ~41% of the server's CPU inside aiohttp's client - request
and response objects, the payload registry, header multidicts, a timer re-armed per read, helper tasks - for requests
that always have one shape: POST a JSON body, read a JSON body or an SSE stream. This module does only that: the
header block is formatted once per request and written with the body in one call, the response is parsed by httptools
(the C parser uvicorn uses, a well-kept library) straight into a list of body pieces, and the read timeout is a timer
armed once and re-armed only when it fires early. TLS is asyncio's. What it leaves out on purpose: proxies (aiohttp
was used without ``trust_env`` too), redirects, compression (no ``Accept-Encoding`` is sent) and cookies.

Kept apart from the replicas' routing and retries (:mod:`.pool`, the backend's retry loop), as httpx keeps its
transport apart from its pool: this layer only moves bytes and says how it failed - ``TimeoutError`` (connect or read)
or :class:`UpstreamDisconnected` (a ``ConnectionError``: refused, reset, closed early, unparsable).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools

# Buffered body bytes of one streamed response before the socket stops being read (the consumer is slower).
_HIGH_WATER = 256 * 1024
# An idle keep-alive connection older than this is closed rather than reused: uvicorn drops idle ones after 5 s, and a
# request written into a connection the server is closing fails (see the stale-connection retry in request()).
_KEEPALIVE_S = 4.0
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})


class UpstreamDisconnected(ConnectionError):
    """The upstream connection failed: refused, reset, closed before the response ended, or not valid HTTP."""


@dataclass(frozen=True)
class Origin:
    """Where a base URL's requests go: what to connect to, the Host header, and the path prefix (e.g. ``/v1``)."""

    scheme: str
    host: str
    port: int
    host_header: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> "Origin":
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = u.port or (443 if u.scheme == "https" else 80)
        default = port == (443 if u.scheme == "https" else 80)
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        return cls(u.scheme, u.hostname, port, host if default else f"{host}:{port}", u.path.rstrip("/"))


def header_block(headers: dict[str, str]) -> bytes:
    """``Name: value\\r\\n`` lines; a CR or LF in a name or value (from a config or an env var) is refused, since it
    would let that text add headers or split the request."""
    out = []
    for k, v in headers.items():
        if "\r" in k or "\n" in k or "\r" in v or "\n" in v:
            raise ValueError(f"header {k!r}: line breaks are not allowed in HTTP headers")
        out.append(f"{k}: {v}\r\n")
    return "".join(out).encode("latin-1")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time. httptools calls the ``on_*`` methods from ``feed_data``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.requests = 0  # sent on this connection (a failure before any answer on a reused one: stale keep-alive)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.head_done = False
        self.keep_alive = False
        self.complete = False
        self.answered = False  # any byte of this request's response arrived
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.timeout = 0.0
        self.last = 0.0

    # -- asyncio.Protocol -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.complete or self.error is not None or self.timer is None:
            self._fail(UpstreamDisconnected("upstream sent bytes outside a response"))
            return
        self.answered = True
        self.last = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamDisconnected("upstream asked for a protocol upgrade"))
        except httptools.HttpParserError as e:
            self._fail(UpstreamDisconnected(f"upstream sent invalid HTTP: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None and not self.complete and self.error is None:
            self._set_error(UpstreamDisconnected(f"upstream closed the connection{': ' + str(exc) if exc else ''}"))

    # -- httptools callbacks --------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))  # decoded only if asked for (Response.headers): most never are

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # read now: the parser forgets it once the message ends
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._stop_timer()
        self._wake()

    # -- the request ------------------------------------------------------------
    def send(self, data: bytes, read_timeout: float) -> None:
        assert self.transport is not None
        if self.paused:  # the last response ended with its reader behind
            self.transport.resume_reading()
        self._reset()
        self.requests += 1
        self.timeout = read_timeout
        self.last = self.loop.time()
        self.timer = self.loop.call_at(self.last + read_timeout, self._on_timer)
        self.transport.write(data)

    def _on_timer(self) -> None:
        """The read timeout (no byte for ``timeout`` s): checked when the timer fires, not re-armed on every read."""
        if self.complete or self.error is not None:
            return
        due = self.last + self.timeout
        if self.loop.time() >= due:
            self._fail(TimeoutError(f"no data from upstream for {self.timeout:g}s"))
        else:
            self.timer = self.loop.call_at(due, self._on_timer)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _set_error(self, exc: BaseException) -> None:
        self.error = exc
        self._stop_timer()
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None and not self.complete:
            self._set_error(exc)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.abort()

    async def wait(self) -> None:
        """Until something changes (headers, a body piece, the end, an error)."""
        if self.error is not None:
            raise self.error
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self) -> bytes:
        """All body bytes buffered so far (one piece, however many reads brought them)."""
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data


class Response:
    """An upstream's answer: ``status`` and lower-cased ``headers`` at once; the body by :meth:`read` or
    :meth:`chunks`. Use it as an async context manager: leaving it hands a finished keep-alive connection back to the
    pool and closes one whose body was not read to the end."""

    def __init__(self, pool: "ConnectionPool", key: Any, conn: _Connection) -> None:
        self._pool = pool
        self._key = key
        self._conn: _Connection | None = conn
        self.status = conn.status
        self._raw = conn.raw_headers
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._raw}
        return self._headers

    async def read(self) -> bytes:
        conn = self._conn
        assert conn is not None, "response already released"
        parts = []
        while not conn.complete:
            if conn.paused:  # a body past the high-water mark: take what is there so the socket is read again
                parts.append(conn.take())
            await conn.wait()
        parts.append(conn.take())
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def text(self) -> str:
        return (await self.read()).decode("utf-8", "replace")

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive: each item is everything that came since the last one."""
        conn = self._conn
        assert conn is not None, "response already released"
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.complete:
                return
            else:
                await conn.wait()

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.complete and not conn.closed and conn.error is None and conn.keep_alive:
            self._pool._put_back(self._key, conn)
        else:
            conn.abort()
            self._pool._drop()

    async def __aenter__(self) -> "Response":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.release()


class ConnectionPool:
    """Keep-alive connections of one backend, at most ``limit`` carrying a request at once (the rest wait, first come
    first served: back-pressure instead of unbounded sockets; waiting is bounded by the caller's deadline)."""

    def __init__(self, *, limit: int = 256, connect_timeout_s: float = 10.0, read_timeout_s: float = 300.0,
                 user_agent: str = "archon-server") -> None:
        self.limit = limit
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._agent = f"User-Agent: {user_agent}\r\n".encode()
        self._idle: dict[Any, list[_Connection]] = {}
        self._busy = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ssl: ssl.SSLContext | None = None
        self._origins: dict[str, Origin] = {}
        self._lines: dict[tuple[str, str, str], bytes] = {}
        self.closed = False

    def origin(self, base_url: str) -> Origin:
        o = self._origins.get(base_url)
        if o is None:
            o = self._origins[base_url] = Origin.parse(base_url)
        return o

    async def request(self, method: str, base_url: str, path: str, *, headers: bytes = b"", body: bytes | None = None,
                      timeout_s: float | None = None) -> Response:
        """Send one request to ``base_url + path``; the Response once its status line and headers are in.
        ``headers``: a :func:`header_block`. ``timeout_s``: this request's read timeout (default the pool's)."""
        if self.closed:
            raise UpstreamDisconnected("the connection pool is closed")
        o = self.origin(base_url)
        key = (o.scheme, o.host, o.port)
        line = self._lines.get((method, base_url, path))
        if line is None:  # the request line, Host and User-Agent of each endpoint, encoded once
            line = self._lines[(method, base_url, path)] = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (
                method.encode(), (o.prefix + path).encode("utf-8") or b"/", o.host_header.encode("idna"), self._agent)
        data = line + headers + (b"Content-Length: %d\r\n\r\n%s" % (len(body), body) if body is not None else b"\r\n")
        await self._acquire()
        try:
            for fresh in (False, True):
                conn = await self._connection(key, o, fresh)
                try:
                    conn.send(data, self.read_timeout_s if timeout_s is None else timeout_s)
                    while not conn.head_done:
                        await conn.wait()
                except UpstreamDisconnected:
                    conn.abort()
                    # A reused keep-alive connection that failed before any answer: most likely the server closed
                    # it as we wrote, but it may have read the request first. Only an idempotent request gets one
                    # more try on a new connection here; a POST (a generation, paid for) goes back to the one retry
                    # loop (backends/http.py), which counts it against max_retries.
                    if conn.requests > 1 and not conn.answered and not fresh and method in _IDEMPOTENT:
                        continue
                    raise
                except BaseException:
                    conn.abort()  # cancelled or timed out mid-request: the connection's state is unknown
                    raise
                return Response(self, key, conn)
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException:
            self._drop()
            raise

    async def _connection(self, key: Any, o: Origin, fresh: bool) -> _Connection:
        loop = asyncio.get_running_loop()
        if not fresh:
            idle = self._idle.get(key)
            now = loop.time()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < _KEEPALIVE_S:
                    return conn
                conn.abort()
        ctx = None
        if o.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ctx = self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Connection(loop), o.host, o.port, ssl=ctx,
                                                       server_hostname=o.host if ctx else None)
        except TimeoutError:
            raise TimeoutError(f"connecting to {o.host}:{o.port} took over {self.connect_timeout_s:g}s") from None
        except ssl.SSLError as e:
            raise UpstreamDisconnected(f"TLS with {o.host}:{o.port} failed: {e}") from None
        return conn

    async def _acquire(self) -> None:
        if self._busy < self.limit:  # then no live waiter exists: _drop hands a slot to one before it frees any
            self._busy += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # _drop/_put_back hands its slot over: _busy is already counted for us
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._drop()  # the slot came as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def _drop(self) -> None:
        """A request's slot is free: the first waiter gets it, or the count goes down."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._busy -= 1

    def _put_back(self, key: Any, conn: _Connection) -> None:
        if self.closed:
            conn.abort()
        else:
            conn.timer = None
            conn.idle_since = conn.loop.time()
            idle = self._idle.setdefault(key, [])
            idle.append(conn)
            if len(idle) > self.limit:
                idle.pop(0).abort()
        self._drop()

    async def close(self) -> None:
        """Close idle connections now; busy ones close when their response is released."""
        self.closed = True
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()
