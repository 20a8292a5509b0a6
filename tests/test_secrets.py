"""Secrets: client keys and upstream API keys never show in logs (at debug), traces or error bodies.

The server runs as a real subprocess (`python -m archon_server -v serve --log-level debug`), so everything it
prints is captured; the upstream refuses and fails in ways that echo the key back, as some providers do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT

from archon_server.config import PRESET_ALIASES
from archon_server.testing.server import serve_process
from archon_server.testing.upstream import FakeUpstream

CLIENT_KEY = "ck-client-9f8e7d6c5b4a-SECRET"
CLIENT_KEY_2 = "ck-second-0a1b2c3d4e5f-SECRET"
UPSTREAM_KEY = "sk-upstream-1234567890abcdef-SECRET"
WRONG_KEY = "ck-attacker-guess-77777777-SECRET"  # what a client tried: not echoed either
SECRETS = [CLIENT_KEY, CLIENT_KEY_2, UPSTREAM_KEY, WRONG_KEY]


def upstream_script(body: dict) -> dict | None:
    text = json.dumps(body.get("messages"))
    if "<401>" in text:
        return {"fault": "401", "message": f"Incorrect API key provided: {UPSTREAM_KEY}. Find your key at ..."}
    if "<403>" in text:
        return {"fault": "403", "message": f"key {UPSTREAM_KEY} has no access to this model"}
    if "<500-straddle>" in text:  # the key sits across the 500-character mark where error text used to be cut
        return {"fault": "500", "message": "x" * 470 + f" Authorization: Bearer {UPSTREAM_KEY}"}
    if "<500>" in text:
        return {"fault": "500", "message": f"boom (request had Authorization: Bearer {UPSTREAM_KEY})"}
    if "<stream>" in text and body.get("stream"):
        return {"fault": "stream_error", "text": "a b c", "message": f"stream died for key {UPSTREAM_KEY}"}
    if "<reset>" in text:
        return {"fault": "reset"}
    return None


@pytest.fixture
def served(tmp_path: Path):
    up = FakeUpstream(upstream_script).start()
    keyfile = tmp_path / "keys.txt"
    keyfile.write_text(f"# client keys\n{CLIENT_KEY_2}\n")
    cfg = {
        "backends": [{"alias": "fake", "kind": "openai", "model": "fake-model", "urls": [up.url], "aliases": PRESET_ALIASES,
                      "api_key_env": "ARCHON_TEST_UPSTREAM_KEY", "max_retries": 0, "read_timeout_s": 5,
                      "breaker_failures": 1000}],
        "architectures_dirs": [str(ROOT / "architectures")],
        "server": {"api_keys_env": "ARCHON_TEST_CLIENT_KEYS", "api_keys_file": str(keyfile), "request_timeout_s": 10},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    env = {"ARCHON_TEST_CLIENT_KEYS": CLIENT_KEY, "ARCHON_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "server.log"
    try:
        with serve_process(["-v", "serve", "-c", str(tmp_path / "config.json"), "--log-level", "debug"],
                           env=env, log=log, cwd=str(ROOT), timeout=60) as (proc, url):
            yield {"url": url, "log": log, "upstream": up, "proc": proc}
    finally:
        up.stop()


def test_keys_never_in_logs_traces_or_error_bodies(served):
    url = served["url"]
    seen: list[str] = []  # every byte the server sent back
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}

    def post(body: dict, headers: dict | None = None) -> httpx.Response:
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers if headers is not None else auth, timeout=30)
        seen.append(r.text)
        return r

    def chat(tag: str, **kw) -> dict:  # type: ignore[no-untyped-def]
        return {"model": "self-moa", "messages": [{"role": "user", "content": f"hello {tag}"}], "return_trace": True, **kw}

    # Client auth: missing, wrong, malformed keys -> 401 without echoing what was sent; both key sources work.
    for h in ({}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": WRONG_KEY}, {"Authorization": f"Basic {WRONG_KEY}"}):
        r = post(chat("ok"), headers=h)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    for path in ("/v1/models", "/metrics", "/openapi.json", "/docs"):
        r = httpx.get(url + path, headers={"Authorization": f"Bearer {WRONG_KEY}"})
        seen.append(r.text)
        assert r.status_code == 401, path  # every route but /health needs a key
    assert httpx.get(url + "/health").status_code == 200
    r = post(chat("ok"))
    assert r.status_code == 200 and r.json()["trace"]
    assert post(chat("ok"), headers={"Authorization": f"Bearer {CLIENT_KEY_2}"}).status_code == 200

    # The upstream got our key (so the secret is really in play)...
    assert any(q.headers.get("Authorization") == f"Bearer {UPSTREAM_KEY}" for q in served["upstream"].requests)

    # ...and refuses/fails echoing it back: as final errors (502 bodies), as recorded failures in a 200's trace
    # (self-moa-seq degrades), and inside a stream.
    for tag in ("<401>", "<403>", "<500>", "<500-straddle>", "<reset>"):
        r = post(chat(tag))
        assert r.status_code == 502, r.text[:300]
        assert "answered" in r.text or "connection" in r.text  # the upstream's error is reported, minus the key
    r = post(chat("<401>", model="self-moa-seq"))
    assert r.status_code in (200, 502)
    r = post(chat("<stream>", stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and '"error"' in r.text and "stream died" in r.text
    seen.append(httpx.get(url + "/metrics", headers=auth).text)
    seen.append(httpx.get(url + "/v1/models", headers=auth).text)

    time.sleep(0.5)  # let the server flush its log lines
    logs = served["log"].read_text(errors="replace")
    assert "DEBUG" in logs  # debug logging really was on
    # The upstream's refusals were logged (per attempt at debug, per request as a warning), key cut out:
    assert "answered 401" in logs and "answered 403" in logs and "stream died" in logs and "***" in logs
    blob = "\n".join(seen) + "\n" + logs
    for secret in SECRETS:
        assert secret not in blob, f"{secret[:6]}... leaked"
        # no recognisable part of it either (a truncated key is still a leak)
        assert secret[:16] not in blob and secret[-16:] not in blob, f"part of {secret[:6]}... leaked"
    assert "***" in "\n".join(seen)  # the echoed key was replaced, not the whole message dropped


def test_keys_in_the_url_are_not_in_the_access_log(served):
    """A key sent as a query parameter is refused (401), but the access log writes the request line: the real
    server's log, as it prints it, must show the parameter names and not the values."""
    url = served["url"]
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    assert httpx.get(url + f"/v1/models?api_key={CLIENT_KEY}").status_code == 401
    assert httpx.get(url + f"/health?token={UPSTREAM_KEY}&verbose=1").status_code == 200
    assert httpx.get(url + f"/v1/models?{WRONG_KEY}", headers=auth).status_code == 200  # a bare value, no name
    r = httpx.post(url + f"/v1/chat/completions?key={CLIENT_KEY_2}", headers=auth, timeout=30,
                   json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    time.sleep(0.5)
    logs = served["log"].read_text(errors="replace")
    access = [ln for ln in logs.splitlines() if '"GET /' in ln or '"POST /' in ln]
    assert len(access) >= 4, logs[-2000:]  # the access log really was written
    for secret in SECRETS:
        assert secret not in logs and secret[:16] not in logs, f"{secret[:6]}... in the log"
    assert any("/v1/models?api_key=*** " in ln and " 401" in ln for ln in access), access
    assert any("/health?token=***&verbose=*** " in ln for ln in access), access
    assert any("/v1/models?*** " in ln for ln in access), access
    assert any("/v1/chat/completions?key=*** " in ln for ln in access), access
