"""Shutting down with requests in flight: uvicorn waits its grace period, then cancels what still runs. Such a
request is answered with a 503 in OpenAI's error schema (the SDKs retry it) -- a stream ends with its endpoint's
error events -- not with uvicorn's plain-text 500 or a dropped connection and a traceback in the log; the backend
calls under it are cancelled."""

from __future__ import annotations

import asyncio
import json
import logging
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

ROOT = Path(__file__).resolve().parent.parent


class Stuck(Backend):
    """Answers "hi" at once to "quick", never to anything else; counts the calls waiting and those cancelled."""

    def __init__(self) -> None:
        self.waiting = 0
        self.cancelled = 0

    async def chat(self, request: ChatRequest) -> ChatResult:
        if request.messages[-1]["content"] == "quick":
            return ChatResult(choices=[Choice(text="hi")], usage=Usage(1, 1), model="stuck")
        self.waiting += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


def _sse(url: str, path: str, body: dict[str, Any], out: dict[str, Any], key: str) -> None:
    """POST a streamed request and keep every SSE line it gets until the server closes the body."""
    try:
        with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=30) as r:
            out[key] = [line for line in r.iter_lines() if line]
    except Exception as e:  # noqa: BLE001 - the test looks at it
        out[key] = e


def test_requests_still_running_at_shutdown_end_with_a_503_in_each_endpoints_form(caplog: pytest.LogCaptureFixture):
    """One server, four requests in flight when it stops: a chat completion, and streamed chat, completions and
    responses. Each ends as its endpoint ends on an error, with the 503 OpenAI's SDKs retry; the log has no traceback."""
    backend = Stuck()
    registry = BackendRegistry()
    registry.register("stuck", backend, "stuck", aliases=PRESET_ALIASES)
    srv = ServerThread(build_app(ServerConfig.model_validate({"architectures_dirs": [str(ROOT / "architectures")]}), registry=registry)).start()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)
    assert client.chat.completions.create(model="stuck", messages=[{"role": "user", "content": "quick"}]).choices[0].message.content == "hi"
    out: dict[str, Any] = {}

    def ask() -> None:
        try:
            out["chat"] = client.chat.completions.create(model="stuck", messages=[{"role": "user", "content": "slow"}])
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out["chat"] = e

    slow = [{"role": "user", "content": "slow"}]
    threads = [threading.Thread(target=ask),
               threading.Thread(target=_sse, args=(srv.url, "/v1/chat/completions", {"model": "stuck", "messages": slow}, out, "chat stream")),
               threading.Thread(target=_sse, args=(srv.url, "/v1/completions", {"model": "self-moa", "prompt": "slow"}, out, "completions stream")),
               threading.Thread(target=_sse, args=(srv.url, "/v1/responses", {"model": "stuck", "input": "slow"}, out, "responses stream"))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while backend.waiting < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert backend.waiting >= 4
    with caplog.at_level(logging.INFO):
        t0 = time.monotonic()
        srv.stop()  # uvicorn's graceful shutdown: ServerThread gives in-flight requests 2 s
        for t in threads:
            t.join(10)
    assert not srv.thread.is_alive() and time.monotonic() - t0 < 10
    message = "the server is shutting down and this request did not finish; retry it"
    error = {"message": message, "type": "server_error", "param": None, "code": "unavailable"}

    err = out["chat"]
    assert isinstance(err, openai.APIStatusError) and err.status_code == 503, err
    assert err.response.json()["error"] == error

    for key in ("chat stream", "completions stream"):
        lines = out[key]
        assert isinstance(lines, list), (key, lines)
        assert lines[-2:] == [f"data: {json.dumps({'error': error})}", "data: [DONE]"], (key, lines)

    lines = out["responses stream"]
    assert isinstance(lines, list), lines
    events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.failed"]
    assert [e["sequence_number"] for e in events] == [0, 1, 2]
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"] == {"code": "unavailable", "message": message}

    assert backend.cancelled == backend.waiting  # every backend call under them was cancelled
    counted = _requests_counted(srv)
    assert counted == {("stuck", "200"): 1, ("stuck", "503"): 3, ("self-moa", "503"): 1}, counted  # none as 499 (client gone)
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]


def _requests_counted(srv: ServerThread) -> dict[tuple[str, str], float]:
    return {(m.labels["model"], m.labels["status"]): m.value for f in srv.config.app.state.chat.metrics.registry.collect()
            if f.name == "archon_requests" for m in f.samples if m.name == "archon_requests_total"}


def test_a_client_leaving_counts_as_499_not_as_shutdown():
    """A client that leaves, streamed or not: its backend call is cancelled and it is counted as 499."""
    backend = Stuck()
    registry = BackendRegistry()
    registry.register("stuck", backend, "stuck", aliases=PRESET_ALIASES)
    srv = ServerThread(build_app(ServerConfig.model_validate({"architectures_dirs": [str(ROOT / "architectures")]}), registry=registry)).start()

    def wait_for(cond: Any) -> None:
        deadline = time.monotonic() + 10
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.02)

    try:
        slow = {"model": "stuck", "messages": [{"role": "user", "content": "slow"}]}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30, json={**slow, "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: ")  # the role chunk: the stream is open
            wait_for(lambda: backend.waiting == 1)
        # that client has gone; the next one gives up waiting for a plain answer
        with pytest.raises(httpx.ReadTimeout):  # 2 s: its backend call is made before it leaves, also under load
            httpx.post(srv.url + "/v1/chat/completions", json=slow, timeout=2.0)
        wait_for(lambda: backend.cancelled == 2 and sum(_requests_counted(srv).values()) == 2)
        assert backend.waiting == 2 and backend.cancelled == 2
        assert _requests_counted(srv) == {("stuck", "499"): 2}
    finally:
        srv.stop()


def test_archon_serve_shutdown_grace_from_the_flag_over_the_config(upstream_factory, tmp_path: Path):
    """``archon serve --shutdown-grace S`` (over the config's ``server.shutdown_grace_s``, here 60 s): a request still
    waiting on its upstream S seconds after SIGTERM is answered 503 and the server exits, not after a minute."""
    import signal

    import yaml

    from archon_server.testing.server import serve_process

    up = upstream_factory(lambda b: {"fault": "hang"})
    cfg = {"backends": [{"alias": "fake", "kind": "openai", "model": "m", "urls": [up.url], "aliases": PRESET_ALIASES}],
           "server": {"shutdown_grace_s": 60}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    got: dict[str, Any] = {}
    with serve_process(["serve", "-c", str(tmp_path / "c.yaml"), "--shutdown-grace", "0.3"], log=tmp_path / "serve.log") as (proc, url):
        def ask() -> None:
            got["r"] = httpx.post(url + "/v1/chat/completions", timeout=90, json={"model": "fake", "messages": [{"role": "user", "content": "x"}]})

        t = threading.Thread(target=ask)
        t.start()
        deadline = time.time() + 30
        while not up.requests and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(45)
        took = time.monotonic() - t0
        t.join(10)
    assert got["r"].status_code == 503 and got["r"].json()["error"]["code"] == "unavailable"
    assert took < 30, took  # 0.3 s of grace, not the config's 60
