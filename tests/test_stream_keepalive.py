"""A streamed Self-MoA answers at once: the role chunk goes out before the inner samples end, and SSE comment
keep-alives follow while they run, so a client can tell a working server from a hung one (issue #14)."""

from __future__ import annotations

import time

import httpx
import openai

from tests.conftest import fake_config

INNER_S = 1.5


def slow_inner(body):  # type: ignore[no-untyped-def]
    return {"latency": INNER_S} if not body.get("stream") else {}  # the six samples are slow, the final fuser streams


def test_role_chunk_at_once_then_keepalives_while_inner_layers_run(upstream_factory, server_factory):
    up = upstream_factory(slow_inner)
    srv = server_factory(fake_config(up.url))
    srv.config.app.state.chat.keepalive_s = 0.2
    body = {"model": "self-moa", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    t0 = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with httpx.Client(timeout=30) as h, h.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                lines.append((time.perf_counter() - t0, line))
    first_t, first = lines[0]
    assert first.startswith("data: ") and '"role":"assistant"' in first and first_t < INNER_S
    keepalives = [t for t, line in lines if line == ": keep-alive"]
    assert len(keepalives) >= 3 and all(t < INNER_S + 1 for t in keepalives[:3])
    content = [t for t, line in lines if '"content":"' in line and '"content":""' not in line]
    assert content and min(content) > INNER_S  # the answer itself comes after the inner layer
    assert lines[-1][1] == "data: [DONE]"

    # The official SDK skips the comments and reads the same stream.
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    chunks = list(client.chat.completions.create(model="self-moa", messages=body["messages"], stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fused answer from 6 responses"
    assert chunks[-1].choices[0].finish_reason == "stop"
