"""`archon serve --workers N`: N server processes on one port answer like one server (official SDK, streamed and
not), and a config whose backends live inside the server process (embedded engine, managed vLLM) is refused with a
clear line instead of loading the model once per worker (issue #20)."""

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

from archon_server.config import PRESET_ALIASES
from archon_server.testing.upstream import free_port

ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def test_workers_share_one_port_and_answer_like_one_server(upstream_factory, tmp_path):
    up = upstream_factory()
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

        def ask(i: int) -> str:
            r = client.chat.completions.create(model="moa-lite", messages=[{"role": "user", "content": f"q{i}"}])
            return r.choices[0].message.content or ""

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(16)))
        assert all(a for a in answers), answers
        chunks = list(client.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "hi"}], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fused answer from 6 responses"
        # uvicorn's supervisor plus two worker processes (its multiprocessing helper may add one more child)
        assert len(_children(proc.pid)) >= 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_workers_refused_with_backends_inside_the_server(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"backends": [{"alias": "default", "kind": "local", "model": "smollm2-135m"}]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "archon_server", "serve", "-c", str(cfg), "--workers", "2"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--workers 2" in r.stderr and "default (kind: local)" in r.stderr and "Traceback" not in r.stderr
