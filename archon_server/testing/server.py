"""Run our FastAPI app under a real uvicorn on a free port: in a thread, or as `archon serve` in its own process (tests, benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from ..api.wire import uvicorn_io
from .upstream import free_port


class ServerThread:
    def __init__(self, app: Any, port: int | None = None):
        self.port = port or free_port()
        # The loop and protocol `archon serve` runs with (api/wire.py), so tests walk the wire users get.
        self.config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", timeout_graceful_shutdown=2,
                                     backlog=4096, **uvicorn_io())
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn-{self.port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "ServerThread":
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server thread died during start-up")
            if time.time() - t0 > timeout:
                raise RuntimeError("server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextmanager
def serve_process(args: list[str], *, env: dict[str, str] | None = None, log: Path | None = None, cwd: str | None = None,
                  timeout: float = 600) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``archon serve ARGS --port <free>`` as a user runs it, in its own process: yields (process, base URL) once /health
    answers 200 (the first start on a machine converts the model, hence the long default), terminates it after."""
    port = free_port()
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - open as long as the server
    proc = subprocess.Popen([sys.executable, "-m", "archon_server", *args, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                            cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
                raise RuntimeError(f"archon serve exited with {proc.returncode}\n{tail}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"archon serve did not become ready in {timeout:g} s")
            time.sleep(0.25)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if out is not subprocess.DEVNULL:
            out.close()
