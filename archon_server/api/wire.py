"""uvicorn's httptools protocol with one socket write per event-loop turn.

uvicorn writes a response's status line and headers when the app sends ``http.response.start`` and the body when
it sends ``http.response.body``: two ``transport.write`` calls, and uvloop sends each at once, so every JSON answer
cost two ``write(2)`` calls and went out as two TCP segments (a quarter of the server's writes at 200 self-moa
clients were these header writes: ``strace -c``). :class:`CoalescingTransport` gathers the writes made within one
turn of the loop and sends them together at its end; a streamed answer's chunks that become ready in the same turn
coalesce the same way. Subclassing uvicorn's protocol (``uvicorn.run(http=...)`` takes a class) keeps all of its
parsing, keep-alive and flow control; only the transport it writes to is wrapped. Measured (a loopback socket, 180
bytes of headers and 900 of body): 15-18 us of CPU for two sends and their receipt, 8-10 us for one.

:func:`uvicorn_io` is the one place that picks the server's loop and protocol: ``archon serve`` (one process or
``--workers``) and the tests' servers (testing/server.py) run the same.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Pending bytes past which a write goes out at once: the real transport's buffer, and with it uvicorn's flow control
# (pause_writing -> the app's next send waits to drain), then sees a large or fast-produced answer as it is written.
FLUSH_BYTES = 64 * 1024


class CoalescingTransport:
    """A transport whose ``write``\\ s in one loop turn leave as one ``write`` to the real transport (at the end of
    the turn, or before ``close``); every other attribute is the real transport's."""

    __slots__ = ("_transport", "_loop", "_pending", "_size")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self._flush()

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        pending, self._pending, self._size = self._pending, [], 0
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending, self._size = [], 0
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol writing through a :class:`CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


def uvicorn_io() -> dict[str, Any]:
    """uvicorn's ``loop`` and ``http`` options: uvloop, and httptools through :class:`CoalescingHttpToolsProtocol`, named
    explicitly ("auto" would fall back to asyncio/h11 silently if they broke; a missing one is logged)."""
    out: dict[str, Any] = {}
    for key, mod in (("loop", "uvloop"), ("http", "httptools")):
        if importlib.util.find_spec(mod) is not None:
            out[key] = mod
        else:
            logging.getLogger("archon.api").warning("%s is not installed: serving on the slower pure-Python %s", mod, key)
    if out.get("http") == "httptools":
        out["http"] = CoalescingHttpToolsProtocol
    return out
