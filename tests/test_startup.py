"""Start-up: the port answers at once and ``/health`` says 503 with the reason until the backends are up
(a local model loads, or on a first start converts, in the background); requests sent meanwhile wait and
are served; a backend that fails to start is named by ``/health``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from archon_server.api.app import build_app
from archon_server.backends.base import Backend, ChatRequest, ChatResult, Choice, Usage
from archon_server.backends.registry import BackendRegistry
from archon_server.config import PRESET_ALIASES, ServerConfig
from archon_server.testing.server import ServerThread
from archon_server.testing.upstream import free_port

ROOT = Path(__file__).resolve().parent.parent


class SlowStart(Backend):
    """Starts when the test says so (or fails to)."""

    def __init__(self, fail: bool = False) -> None:
        self.go = threading.Event()
        self.fail = fail

    async def start(self) -> None:
        import asyncio

        while not self.go.is_set():
            await asyncio.sleep(0.02)
        if self.fail:
            raise RuntimeError("weights file is corrupt")

    @property
    def start_status(self) -> str:
        return "loading weights"

    async def chat(self, request: ChatRequest) -> ChatResult:
        return ChatResult(choices=[Choice(text="ready now")], usage=Usage(3, 2), model="slow")


def serve(backend: Backend) -> ServerThread:
    registry = BackendRegistry()
    registry.register("slow", backend, "slow", aliases=PRESET_ALIASES)
    return ServerThread(build_app(ServerConfig.model_validate({"architectures_dirs": [str(ROOT / "architectures")]}), registry=registry)).start()


def test_health_is_503_with_the_reason_while_starting_and_requests_wait():
    backend = SlowStart()
    srv = serve(backend)
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "starting", "reason": "backend slow: loading weights"}
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        answers: list[Any] = []
        t = threading.Thread(target=lambda: answers.append(client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}])))
        t.start()
        time.sleep(0.5)
        assert not answers and httpx.get(srv.url + "/health").status_code == 503  # the request waits for the start
        backend.go.set()
        t.join(10)
        assert answers and answers[0].choices[0].message.content == "ready now"
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    finally:
        srv.stop()


def test_a_backend_that_fails_to_start_is_named_by_health():
    backend = SlowStart(fail=True)
    backend.go.set()
    srv = serve(backend)
    try:
        deadline = time.time() + 10
        while (r := httpx.get(srv.url + "/health")).json()["status"] == "starting" and time.time() < deadline:
            time.sleep(0.05)
        assert r.status_code == 503 and r.json() == {"status": "error", "reason": "backend slow failed to start: weights file is corrupt"}
    finally:
        srv.stop()


@pytest.mark.e2e
@pytest.mark.slow
def test_first_start_of_archon_serve_answers_503_while_converting(tmp_path):
    """The README's `archon serve` with an empty model cache: /health answers (503, converting) within
    seconds, the log shows the conversion's progress, then the server is ready and answers."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ARCHON_CACHE_DIR": str(tmp_path / "cache")}
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "archon_server", "serve", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        seen: list[dict[str, Any]] = []
        while time.time() - t0 < 600:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                r = httpx.get(url + "/health", timeout=5)
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            if r.status_code == 200:
                break
            assert r.status_code == 503
            seen.append(r.json())
            time.sleep(0.2)
        ready_s = time.time() - t0
        assert seen and "converting smollm2-135m-instruct" in seen[0]["reason"], seen[:3]
        text = log.read_text()
        assert "dequantized" in text and "converted in" in text, text[-3000:]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=8).choices[0].message.content
        print(f"first start: ready in {ready_s:.1f}s (load {os.getloadavg()})")
    finally:
        proc.terminate()
        proc.wait(30)
