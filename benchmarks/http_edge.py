"""The two per-request costs of the HTTP edge that api/json_route.py and api/wire.py cut, measured side by side.

    python benchmarks/http_edge.py [--requests 3000] [--rounds 3]

``route``: CPU per request of a FastAPI app whose one route takes a chat-completion body (ChatCompletionRequest) and
answers ``{}``, called in-process as ASGI (no sockets): FastAPI's own request handler against JSONBodyRoute.
``send``: CPU per answer on a loopback TCP socket (TCP_NODELAY, as uvloop sets it), status line and headers (180 B)
and body (900 B) as two sends, the way uvicorn's protocol writes them, against one send (CoalescingTransport); the
reading side runs in a thread of this process, so its receive cost is in the figure too.
The end-to-end effect is below what ``benchmarks/overhead.py`` can resolve on 2 shared cores (its CPU per call moves
±6 % between runs of the same tree); these are the figures the change rests on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi import APIRouter, FastAPI, Request  # noqa: E402
from fastapi.routing import APIRoute  # noqa: E402
from starlette.responses import Response  # noqa: E402

from archon_server.api.chat.protocol import ChatCompletionRequest  # noqa: E402
from archon_server.api.json_route import JSONBodyRoute  # noqa: E402

BODY = json.dumps({
    "model": "self-moa", "temperature": 0.7, "max_tokens": 256,
    "messages": [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "Explain the theory of relativity in simple words, with one example."}],
}).encode()


def _app(route_class: type[APIRoute]) -> FastAPI:
    app = FastAPI()
    router = APIRouter(route_class=route_class)

    @router.post("/v1/chat/completions")
    async def create(body: ChatCompletionRequest, request: Request) -> Response:
        return Response(b"{}", media_type="application/json")

    app.include_router(router)
    return app


async def _route_us(app: FastAPI, n: int) -> float:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: object) -> None:
        return None

    t = time.process_time()
    for _ in range(n):
        await app(dict(scope), receive, send)
    return (time.process_time() - t) / n * 1e6


def _send_us(split: bool, n: int) -> float:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    out = socket.create_connection(srv.getsockname())
    out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    inn, _ = srv.accept()

    def drain() -> None:
        while inn.recv(1 << 20):
            pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    head, body = b"h" * 180, b"b" * 900
    t = time.process_time()
    for _ in range(n):
        if split:
            out.send(head)
            out.send(body)
        else:
            out.send(head + body)
    used = time.process_time() - t
    out.close()
    reader.join()
    inn.close()
    srv.close()
    return used / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    apps = {"fastapi": _app(APIRoute), "lean": _app(JSONBodyRoute)}
    route: dict[str, list[float]] = {k: [] for k in apps}
    send: dict[str, list[float]] = {"two sends": [], "one send": []}
    for app in apps.values():
        asyncio.run(_route_us(app, 200))  # warm-up
    for _ in range(a.rounds):  # alternating, so drift on a shared machine falls on both sides
        for k, app in apps.items():
            route[k].append(asyncio.run(_route_us(app, a.requests)))
        send["two sends"].append(_send_us(True, a.requests * 5))
        send["one send"].append(_send_us(False, a.requests * 5))

    def show(d: dict[str, list[float]]) -> str:
        return ", ".join(f"{k} {statistics.median(v):.1f} us ({min(v):.1f}-{max(v):.1f})" for k, v in d.items())

    (r0, r1), (s0, s1) = ([statistics.median(v) for v in d.values()] for d in (route, send))
    print(f"route  (CPU per request, median of {a.rounds}): {show(route)}; lean/fastapi {r1 / r0:.2f}")
    print(f"send   (CPU per answer,  median of {a.rounds}): {show(send)}; one/two {s1 / s0:.2f}")


if __name__ == "__main__":
    main()
