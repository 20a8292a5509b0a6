"""``stream_options: {"include_usage": true}``: OpenAI documents that the usage chunk comes last (empty ``choices``)
and that "all other chunks will also include a usage field, but with a null value". Every chunk but the last lacked
the key, so a client reading ``chunk["usage"]`` on each chunk (raw httpx, as the docs show it) failed with a KeyError
on the first one. Without include_usage the chunks stay as they were (no usage key).

Real parts: the in-process server (a real uvicorn) on a scripted HTTP upstream, raw httpx for the wire bytes and the
official openai SDK for the parsed stream.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import fake_config

ASK = {"messages": [{"role": "user", "content": "Name two colours."}], "max_tokens": 16}


def _events(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + path, json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


@pytest.mark.parametrize("model,n", [("fake", 1), ("fake", 3), ("self-moa", 1), ("best-of-n", 1)])
def test_every_chat_chunk_carries_usage_null_but_the_usage_chunk(upstream_factory, server_factory, model, n):
    srv = server_factory(fake_config(upstream_factory().url))
    chunks = _events(srv.url, "/v1/chat/completions", {**ASK, "model": model, "n": n, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    *body, last = chunks
    assert body and all("usage" in c and c["usage"] is None for c in body), [c for c in body if c.get("usage", 0) is not None]
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
    assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in body)
    plain = _events(srv.url, "/v1/chat/completions", {**ASK, "model": model, "n": n, "stream": True})
    assert all("usage" not in c for c in plain)
    # the SDK reads the same stream: usage on the last chunk only
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)
    got = list(client.chat.completions.create(model=model, n=n, stream=True, stream_options={"include_usage": True}, **ASK))
    assert [c.usage is not None for c in got] == [False] * (len(got) - 1) + [True]


def test_chat_trace_events_and_completions_chunks_too(upstream_factory, server_factory):
    srv = server_factory(fake_config(upstream_factory().url))
    traced = _events(srv.url, "/v1/chat/completions", {**ASK, "model": "self-moa", "stream": True, "stream_trace": True,
                                                       "stream_options": {"include_usage": True}})
    assert any("trace_event" in c for c in traced)
    assert all(c["usage"] is None for c in traced[:-1]) and traced[-1]["usage"]["total_tokens"] > 0
    for model in ("fake", "self-moa"):
        body = {"model": model, "prompt": ["The sea is", "The sky is"], "max_tokens": 8, "stream": True}
        *rest, last = _events(srv.url, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
        assert rest and all("usage" in c and c["usage"] is None for c in rest)
        assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
        assert all("usage" not in c for c in _events(srv.url, "/v1/completions", body))
