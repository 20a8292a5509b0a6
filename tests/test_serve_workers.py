"""`archon serve --workers N`: N server processes on one port answer like one server (official SDK, streamed and
not), and backends that live inside a server process (the embedded engine) are loaded once, in one backend host
process that every worker calls (issue #20)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from archon_server.config import PRESET_ALIASES
from archon_server.testing.server import serve_process
from archon_server.testing.procs import alive, descendants
from archon_server.testing.upstream import free_port

ROOT = Path(__file__).resolve().parent.parent


def _in_flight(url: str) -> float:
    lines = httpx.get(url + "/metrics").text.splitlines()
    return sum(float(ln.split()[-1]) for ln in lines if ln.startswith("archon_requests_in_flight"))


def _workers(pid: int) -> list[int]:
    """uvicorn's worker processes under the server (multiprocessing's spawn children; not its resource tracker)."""
    out = []
    for child in descendants(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
        except OSError:
            pass
    return out


def test_workers_share_one_port_and_answer_like_one_server(upstream_factory, tmp_path):
    # A prompt with "linger" is answered after 8 s: requests held in flight while their workers are killed.
    up = upstream_factory(lambda body: {"latency": 8} if "linger" in json.dumps(body) else None)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({
        "backends": [{"alias": "fake", "kind": "openai", "model": "fake-model", "urls": [up.url], "aliases": PRESET_ALIASES}],
        "architectures_dirs": [str(ROOT / "architectures")],
    }))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "archon_server", "serve", "-c", str(cfg), "--port", str(port), "--workers", "2",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.3)
        else:
            raise AssertionError("server with --workers 2 did not come up")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        def ask(i: int) -> tuple[str, str]:
            r = client.chat.completions.create(model="moa-lite", messages=[{"role": "user", "content": f"q{i}"}])
            return r.id, r.choices[0].message.content or ""

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids, answers = zip(*pool.map(ask, range(16)))
        assert all(a for a in answers), answers
        # Both workers served some; the list and each trace come whole from whichever worker answers the GET.
        for _ in range(4):
            listed = httpx.get(url + "/v1/traces", params={"limit": 100}).json()["data"]
            assert {t["id"] for t in listed} == set(ids)
            assert [t["created"] for t in listed] == sorted((t["created"] for t in listed), reverse=True)
            assert len(httpx.get(url + "/v1/traces", params={"limit": 5}).json()["data"]) == 5
        for trace_id in ids:
            got = httpx.get(url + f"/v1/traces/{trace_id}")
            assert got.status_code == 200 and got.json()["trace"]["layers"], got.text
        assert httpx.get(url + "/v1/traces/chatcmpl-none").status_code == 404
        for _ in range(4):  # /metrics of whichever worker answers: all workers' requests, summed
            lines = httpx.get(url + "/metrics").text.splitlines()
            served = sum(float(ln.split()[-1]) for ln in lines if ln.startswith('archon_requests_total{model="moa-lite"'))
            assert served == 16, [ln for ln in lines if ln.startswith("archon_requests_total")]
        chunks = list(client.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "hi"}], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fused answer from 6 responses"
        # uvicorn's supervisor plus two worker processes (its multiprocessing helper may add one more child)
        assert len(descendants(proc.pid)) >= 2
        # Workers killed with requests in flight: uvicorn starts new ones, and the dead ones' in-flight count leaves
        # the sum (it stayed there for good before: prometheus_client keeps a dead process's live gauge file).
        slow = client.with_options(timeout=30)
        lingering = concurrent.futures.ThreadPoolExecutor(6)
        for i in range(6):
            lingering.submit(slow.chat.completions.create, model="moa-lite", messages=[{"role": "user", "content": f"linger {i}"}])
        deadline = time.time() + 20
        while _in_flight(url) < 6 and time.time() < deadline:
            time.sleep(0.1)
        assert _in_flight(url) == 6
        killed = _workers(proc.pid)
        assert len(killed) == 2, killed
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        lingering.shutdown(wait=True)  # each fails: its worker is gone
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if _in_flight(url) == 0 and len(set(_workers(proc.pid)) - set(killed)) == 2:
                    break
            except httpx.HTTPError:
                pass  # no worker up yet
            time.sleep(0.3)
        assert _in_flight(url) == 0
        assert client.chat.completions.create(model="moa-lite", messages=[{"role": "user", "content": "again"}]).choices[0].message.content
        # The server killed with SIGKILL (it runs no code): its workers go with it, instead of holding the port.
        workers = _workers(proc.pid)
        assert workers
        proc.kill()
        proc.wait(10)
        deadline = time.time() + 20
        while any(alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in workers), [p for p in workers if alive(p)]
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _maps_torch(pid: int) -> bool:
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.e2e
def test_workers_share_one_embedded_engine_that_survives_a_crash(tmp_path):
    """The README's default config (embedded SmolLM2 + the lazy gemma3 scorer) with --workers 2: one backend host
    process loads the engine, both workers answer through it, and a killed host is restarted under them."""
    log = tmp_path / "serve.log"
    q = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    with serve_process(["serve", "--workers", "2"], log=log, cwd=str(ROOT)) as (proc, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)

        def greedy(_: int) -> str:
            r = client.chat.completions.create(model="smollm2", messages=q, temperature=0, max_tokens=24)
            return r.choices[0].message.content or ""

        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # new connections: both workers answer
            answers = set(pool.map(greedy, range(8)))
        assert len(answers) == 1 and "paris" in answers.pop().lower()
        assert len(client.chat.completions.create(model="smollm2", messages=q, n=3, max_tokens=16).choices) == 3
        stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Tell a long story."}],
                                                max_tokens=300, stream=True)
        for i, _chunk in enumerate(stream):
            if i == 3:
                break
        stream.close()  # abandoned mid-answer: cancelled in the host, the next requests go on
        r = client.chat.completions.create(model="self-moa", messages=q, max_tokens=48, seed=3, extra_body={"return_trace": True})
        assert "paris" in (r.choices[0].message.content or "").lower()
        assert r.model_extra["trace"]["layers"][0]["calls"][0]["n"] == 6

        tree = descendants(proc.pid)
        engines = [p for p in tree if _maps_torch(p)]
        assert len(engines) == 1, f"processes with torch loaded: {engines} of {tree}"  # the host, not the workers
        host = engines[0]
        # the workers' metrics directory is not handed to the host (a managed vLLM under it would write there)
        assert b"PROMETHEUS_MULTIPROC_DIR=" not in Path(f"/proc/{host}/environ").read_bytes()

        def engine_requests() -> float:  # as a worker's /metrics says (any worker: the one engine's counters)
            lines = [ln for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith('archon_backend_requests_total{backend="smollm2"}')]
            return float(lines[0].split()[-1]) if lines else 0.0

        seen = [engine_requests() for _ in range(6)]  # new connections: both workers, refreshed every second
        while seen[-1] < 11 and len(seen) < 60:
            time.sleep(0.2)
            seen.append(engine_requests())
        assert seen[-1] >= 11, seen  # 8 + 1 + 1 + 1 requests above went into the one engine

        # A schema the engine cannot constrain to (`not`: llguidance does not implement it) is a worker's 400 before any
        # call, as with one process: the worker compiles it itself (it had reached the host's engine after the samples)
        unenforceable = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}, "required": ["a"]}
        rf = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": unenforceable}}
        before = max(engine_requests() for _ in range(6))
        for model in ("self-moa", "smollm2"):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=model, messages=q, max_tokens=16, response_format=rf)
            assert e.value.body["param"] == "response_format", e.value.body
        time.sleep(2.5)  # both workers' engine counters refreshed (every second)
        assert max(engine_requests() for _ in range(6)) == before  # no call reached the engine

        os.kill(host, signal.SIGKILL)
        deadline, again = time.time() + 180, None
        while time.time() < deadline and again is None:
            try:
                again = greedy(0)
            except openai.APIError:  # the calls that met the dead host: a clear error, then the restarted one answers
                time.sleep(0.5)
        assert again is not None and "paris" in again.lower()
        engines = [p for p in descendants(proc.pid) if _maps_torch(p)]
        assert len(engines) == 1 and engines[0] != host
        assert "restarting it" in log.read_text()
    deadline = time.time() + 30
    while time.time() < deadline and alive(engines[0]):
        time.sleep(0.2)
    assert not alive(engines[0]), "the backend host outlived the server"
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
