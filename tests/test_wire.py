"""api/wire.py: one socket write per loop turn, and everything uvicorn sends still arrives whole and in order."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.responses import Response, StreamingResponse

from archon_server.api.wire import FLUSH_BYTES, CoalescingHttpToolsProtocol, CoalescingTransport, uvicorn_io
from archon_server.testing.server import ServerThread


class Recorder:
    """A transport that records what reaches it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def test_writes_in_one_turn_leave_as_one() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rec = Recorder()
        t = CoalescingTransport(rec, loop)  # type: ignore[arg-type]
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"")
        t.write(b"body")
        assert rec.writes == [] and t.get_write_buffer_size() == 23
        await asyncio.sleep(0)
        assert rec.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        # a large answer goes out as it is written, so the real transport's flow control sees it
        t.write(b"a" * 10)
        t.write(b"b" * FLUSH_BYTES)
        assert rec.writes[-1] == b"a" * 10 + b"b" * FLUSH_BYTES
        await asyncio.sleep(0)
        assert len(rec.writes) == 2
        # close sends what is pending first; other attributes are the real transport's
        t.write(b"last")
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)
        t.close()
        assert rec.writes[-1] == b"last" and rec.closed
        await asyncio.sleep(0)
        assert len(rec.writes) == 3  # the scheduled flush finds nothing left
        # abort drops what is pending
        rec2 = Recorder()
        t2 = CoalescingTransport(rec2, loop)  # type: ignore[arg-type]
        t2.write(b"x")
        t2.abort()
        await asyncio.sleep(0)
        assert rec2.writes == [] and rec2.aborted

    asyncio.run(main())


BIG = bytes(range(256)) * 4096  # 1 MiB


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/small")
    async def small() -> Response:
        return Response(b'{"ok":true}', media_type="application/json")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():  # type: ignore[no-untyped-def]
            for i in range(0, len(BIG), 1000):  # never waits: every chunk is ready in the same loop turn
                yield BIG[i:i + 1000]
        return StreamingResponse(chunks(), media_type="application/octet-stream")

    return app


def test_a_real_server_sends_small_streamed_and_large_answers_whole() -> None:
    assert uvicorn_io().get("http") is CoalescingHttpToolsProtocol
    with ServerThread(_app()) as s:
        assert s.config.http is CoalescingHttpToolsProtocol
        with httpx.Client(base_url=s.url) as c:  # keep-alive: every request on one connection
            for _ in range(3):
                assert c.get("/small").json() == {"ok": True}
                r = c.get("/stream")
                assert hashlib.sha256(r.content).digest() == hashlib.sha256(BIG).digest()
        # A small answer's status line, headers and body leave in one write: one read gets all of it.
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(b"GET /small HTTP/1.1\r\nhost: x\r\n\r\n")
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200") and first.endswith(b'{"ok":true}')
