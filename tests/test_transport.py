"""The upstream HTTP client (backends/transport.py) against real sockets: keep-alive, a stale keep-alive retried once (idempotent requests only),
the read timeout, chunked bodies, a slow reader, the pool's limit with cancelled waiters, TLS, header injection.

The raw servers here are asyncio stream servers that write HTTP by hand, so that each test controls exactly what
the upstream does on the wire (close after the response, stall mid-body, drop a reused connection unanswered)."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from archon_server.backends.transport import ConnectionPool, UpstreamDisconnected, header_block

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class RawServer:
    """Reads one request at a time per connection; ``handler(reader, writer, request_no)`` answers it and says
    whether to keep the connection for the next one. Counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests = 0
        self.closed_by_peer = 0

    async def __aenter__(self) -> "RawServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
                await reader.readexactly(length)
                self.requests += 1
                if not await self.handler(reader, writer, self.requests):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_peer += 1
        except asyncio.CancelledError:  # the test's loop is ending
            pass
        finally:
            writer.close()


def ok(body: bytes = b'{"ok": true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
    writer.write(ok())
    await writer.drain()
    return True


async def get(pool: ConnectionPool, url: str, body: bytes = b"{}", method: str = "POST") -> tuple[int, bytes]:
    async with await pool.request(method, url, "/chat/completions", body=body) as resp:
        return resp.status, await resp.read()


async def test_keep_alive_carries_every_request_on_one_connection():
    async with RawServer(answer_ok) as srv:
        pool = ConnectionPool()
        for _ in range(5):
            assert await get(pool, srv.url) == (200, b'{"ok": true}')
        assert (srv.connections, srv.requests) == (1, 5)
        await pool.close()


async def test_connection_close_and_http_1_0_are_not_reused():
    async def close_after(reader, writer, n):
        writer.write(ok(extra=b"Connection: close\r\n") if n % 2 else b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True  # the server would keep it: the client must not

    async with RawServer(close_after) as srv:
        pool = ConnectionPool()
        for _ in range(4):
            assert (await get(pool, srv.url))[0] == 200
        assert srv.connections == 4
        await pool.close()


async def drop_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
    if n == 2:  # the keep-alive race: the server closes the idle connection just as the request arrives
        return False
    writer.write(ok())
    await writer.drain()
    return True


async def test_a_reused_connection_dropped_unanswered_is_retried_once_on_a_new_one():
    async with RawServer(drop_second) as srv:
        pool = ConnectionPool()
        assert (await get(pool, srv.url, method="GET"))[0] == 200
        assert (await get(pool, srv.url, method="GET"))[0] == 200  # dropped on the reused connection, answered on a new one
        assert (srv.connections, srv.requests) == (2, 3)
        await pool.close()


async def test_a_post_dropped_on_a_reused_connection_is_not_resent_by_the_transport():
    """The server read the POST before dropping it (it may have started a paid generation): whether to send it
    again is the backend's retry loop's call, counted against max_retries, not a hidden second try here."""
    async with RawServer(drop_second) as srv:
        pool = ConnectionPool()
        assert (await get(pool, srv.url))[0] == 200
        with pytest.raises(UpstreamDisconnected):
            await get(pool, srv.url)
        assert (srv.connections, srv.requests) == (1, 2)
        assert pool._busy == 0
        assert (await get(pool, srv.url))[0] == 200  # and the pool goes on, on a new connection
        await pool.close()


async def test_a_new_connection_dropped_unanswered_fails_without_a_retry():
    async def drop(reader, writer, n):
        return False

    async with RawServer(drop) as srv:
        pool = ConnectionPool()
        with pytest.raises(UpstreamDisconnected):
            await get(pool, srv.url)
        assert (srv.connections, srv.requests) == (1, 1)  # the retry policy is the backend's, not the transport's
        assert pool._busy == 0
        await pool.close()


async def test_a_body_cut_short_is_an_error_not_a_short_answer():
    async def cut(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial\"")
        await writer.drain()
        return False

    async with RawServer(cut) as srv:
        pool = ConnectionPool()
        with pytest.raises(UpstreamDisconnected):
            await get(pool, srv.url)
        await pool.close()


async def test_the_read_timeout_counts_silence_not_the_whole_answer():
    # Margins of 0.8 s or more either way (they were 0.25 s: a loaded machine's stall can stretch a 0.1 s gap, or the
    # wait for the timeout, by that much): gaps of 0.2 s against a 1 s timeout, then a 3 s gap.
    async def dribble(reader, writer, n):
        pieces = [b"x" * 10] * 6
        delay = 0.2 if n == 1 else 3.0
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n")
        for p in pieces:
            await asyncio.sleep(delay)
            writer.write(p)
            await writer.drain()
        return True

    async with RawServer(dribble) as srv:
        pool = ConnectionPool(read_timeout_s=1.0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await get(pool, srv.url) == (200, b"x" * 60)  # 1.2 s in all, never 1 s of silence
        assert loop.time() - t0 > 1.1
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await get(pool, srv.url)
        assert loop.time() - t0 < 2.5  # the 1 s of silence, not the 3 s until the first piece
        assert pool._busy == 0
        await pool.close()


async def test_chunked_body_streams_in_pieces_and_a_slow_reader_loses_nothing():
    piece = bytes(range(256)) * 256  # 64 KiB
    count = 80  # 5 MiB: past the high-water mark, so the socket is paused and resumed

    async def chunked(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(count):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async with RawServer(chunked) as srv:
        pool = ConnectionPool()
        got = bytearray()
        pauses = []
        async with await pool.request("GET", srv.url, "/stream") as resp:
            transport = resp._conn.transport
            pause = transport.pause_reading
            transport.pause_reading = lambda: (pauses.append(len(got)), pause())  # type: ignore[method-assign]
            async for data in resp.chunks():
                got += data
                await asyncio.sleep(0.01)
            transport.pause_reading = pause  # type: ignore[method-assign]
        assert bytes(got) == piece * count
        assert pauses
        assert await get(pool, srv.url) == (200, piece * count)  # the same connection, resumed, serves the next
        assert srv.connections == 1
        await pool.close()


async def test_a_response_left_unread_closes_its_connection():
    async def long_body(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"y" * 1000)
        await writer.drain()
        await asyncio.sleep(0.3)
        return False

    async with RawServer(long_body) as srv:
        pool = ConnectionPool()
        async with await pool.request("GET", srv.url, "/x") as resp:
            async for _ in resp.chunks():
                break  # the client went away after the first piece
        await asyncio.sleep(0.05)
        assert pool._busy == 0 and not pool._idle.get(("http", "127.0.0.1", int(srv.url.split(":")[2].split("/")[0])))
        await pool.close()


async def test_the_pool_limit_queues_requests_and_a_cancelled_waiter_passes_its_turn_on():
    async with RawServer(answer_ok) as srv:
        pool = ConnectionPool(limit=1)
        first = await pool.request("POST", srv.url, "/a", body=b"{}")
        waiting = asyncio.create_task(get(pool, srv.url))
        behind = asyncio.create_task(get(pool, srv.url))
        await asyncio.sleep(0.05)
        assert not waiting.done() and not behind.done()
        waiting.cancel()
        await asyncio.sleep(0.01)
        await first.read()
        first.release()
        assert await asyncio.wait_for(behind, 5) == (200, b'{"ok": true}')
        assert waiting.cancelled()
        assert pool._busy == 0
        assert srv.connections == 1
        await pool.close()


async def test_cancelling_a_request_mid_answer_frees_its_slot_and_drops_its_connection():
    async def slow(reader, writer, n):
        await asyncio.sleep(0.5 if n == 1 else 0)
        writer.write(ok())
        await writer.drain()
        return True

    async with RawServer(slow) as srv:
        pool = ConnectionPool(limit=1)
        task = asyncio.create_task(get(pool, srv.url))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool._busy == 0
        assert await get(pool, srv.url) == (200, b'{"ok": true}')  # on a new connection: the old one's state was unknown
        assert srv.connections == 2
        await pool.close()


async def test_refused_connection_is_a_connection_error():
    async with RawServer(answer_ok) as srv:
        url = srv.url
    pool = ConnectionPool(connect_timeout_s=2)
    with pytest.raises(ConnectionError):
        await get(pool, url)
    assert pool._busy == 0


def test_a_header_with_a_line_break_is_refused():
    assert header_block({"X-A": "1"}) == b"X-A: 1\r\n"
    with pytest.raises(ValueError, match="line breaks"):
        header_block({"X-A": "1\r\nX-Injected: yes"})


async def test_https_to_a_server_whose_certificate_the_system_trusts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"scheme": request.scheme, "body": (await request.json())["q"]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "localhost", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        url = f"https://localhost:{port}/v1"
        with pytest.raises(UpstreamDisconnected, match="TLS"):  # not trusted yet: verification fails
            await get(ConnectionPool(), url, b'{"q": 1}')
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # as a user points OpenSSL at a private CA
        pool = ConnectionPool()
        assert await get(pool, url, b'{"q": 2}') == (200, b'{"scheme": "https", "body": 2}')
        assert await get(pool, url, b'{"q": 3}') == (200, b'{"scheme": "https", "body": 3}')
        await pool.close()
    finally:
        await runner.cleanup()
    assert os.environ.get("SSL_CERT_FILE") == str(cert)
