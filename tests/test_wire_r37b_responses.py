"""Through the wire (a real uvicorn, the official openai SDK) on a scripted upstream: a streamed Response cut by
max_output_tokens ends with OpenAI's response.incomplete (it was a response.completed carrying the status), and its
times are integer seconds."""

from __future__ import annotations

import json

import httpx
import openai
from conftest import fake_config


def client(srv) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)


def test_a_truncated_streamed_response_ends_with_response_incomplete(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"text": "a cut answer", "finish_reason": "length"})
    srv = server_factory(fake_config(up.url))
    events = list(client(srv).responses.create(model="fake", input="Q", stream=True, max_output_tokens=16))
    last = events[-1]
    assert [e.type for e in events if e.type in ("response.completed", "response.incomplete")] == ["response.incomplete"]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output[0].content[0].text == "a cut answer"
    r = httpx.post(srv.url + "/v1/responses", json={"model": "fake", "input": "Q", "stream": True, "max_output_tokens": 16})
    created = [ln for ln in r.text.splitlines() if ln.startswith("data:")][0]
    assert isinstance(json.loads(created[5:])["response"]["created_at"], int)
    full = client(srv).responses.create(model="fake", input="Q", max_output_tokens=16)
    raw = httpx.get(srv.url + f"/v1/responses/{full.id}").json()
    assert isinstance(raw["created_at"], int) and isinstance(raw["completed_at"], int)


def test_a_finished_streamed_response_ends_with_response_completed(upstream_factory, server_factory):
    srv = server_factory(fake_config(upstream_factory().url))
    events = list(client(srv).responses.create(model="fake", input="Q", stream=True))
    assert events[-1].type == "response.completed" and events[-1].response.status == "completed"
