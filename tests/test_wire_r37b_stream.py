"""Through the wire (a real uvicorn, the official openai SDK) on a scripted upstream: a streamed request refused
before its first token is an HTTP error as the non-streamed one is (not a 200 and an error event), and a
context-length refusal carries OpenAI's param and code; a stream that has started ends as before."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from conftest import fake_config

CONTEXT = ("This model's maximum context length is 8192 tokens. However, your messages resulted in 10831 tokens. "
           "Please reduce the length of the messages.")
Q = [{"role": "user", "content": "Q"}]


def client(srv) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)


@pytest.fixture
def refused(upstream_factory, server_factory):  # type: ignore[no-untyped-def]
    """A server whose upstream refuses every prompt as too long, as vLLM does (a 400 before any stream bytes)."""
    up = upstream_factory(lambda b: {"fault": "400", "message": CONTEXT})
    return server_factory(fake_config(up.url))


@pytest.mark.parametrize("model", ["fake", "self-moa"])  # a backend alias; an architecture whose first call fails so
def test_a_streamed_prompt_past_the_context_is_a_400_before_the_stream(refused, model):
    c = client(refused)
    with pytest.raises(openai.BadRequestError) as plain:
        c.chat.completions.create(model=model, messages=Q, max_tokens=5)
    with pytest.raises(openai.BadRequestError) as streamed:
        c.chat.completions.create(model=model, messages=Q, max_tokens=5, stream=True)
    for e in (plain.value, streamed.value):
        assert e.status_code == 400 and e.body["code"] == "context_length_exceeded" and e.body["param"] == "messages", e.body
        assert CONTEXT in e.body["message"] and e.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:  # /v1/responses alike
        c.responses.create(model=model, input="Q", stream=True)
    assert e.value.body["code"] == "context_length_exceeded" and CONTEXT.replace("messages", "input") in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):  # and /v1/completions
        c.completions.create(model=model, prompt="Q", max_tokens=5, stream=True)
    # the wire: no 200, no event stream
    r = httpx.post(refused.url + "/v1/chat/completions", json={"model": model, "messages": Q, "stream": True})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    metrics = httpx.get(refused.url + "/metrics").text
    assert f'archon_requests_total{{model="{model}",status="400"}} 5.0' in metrics  # counted once each


def test_a_failure_after_the_first_token_still_ends_the_stream_with_its_error(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"fault": "stream_error", "text": "one two three four"})
    srv = server_factory(fake_config(up.url))
    chunks = []
    with pytest.raises(openai.APIError) as e:
        for ch in client(srv).chat.completions.create(model="fake", messages=Q, stream=True):
            chunks.append(ch)
    assert chunks and chunks[0].choices[0].delta.role == "assistant" and not isinstance(e.value, openai.APIStatusError)


def test_a_normal_stream_is_unchanged(upstream_factory, server_factory):
    srv = server_factory(fake_config(upstream_factory().url))
    chunks = list(client(srv).chat.completions.create(model="fake", messages=Q, stream=True, n=2))
    assert {c.choices[0].index for c in chunks[:2] if c.choices} == {0, 1} and chunks[0].choices[0].delta.role == "assistant"
    assert sorted(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason) == ["stop", "stop"]


def test_a_client_that_leaves_while_the_start_is_held_is_a_499(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"latency": 3.0})
    srv = server_factory(fake_config(up.url))
    # The client leaves after 1.5 s of silence: the server's upstream call must be out by then (0.5 s was the whole
    # margin for that on a loaded machine), and the upstream's answer, 3 s on, is still far off.
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json={"model": "fake", "messages": Q, "stream": True},
                          timeout=httpx.Timeout(5, read=1.5)) as r:
            for _ in r.iter_raw():
                pass
    for _ in range(300):  # up to 30 s on a loaded machine; at once when it is counted
        if 'archon_requests_total{model="fake",status="499"} 1.0' in httpx.get(srv.url + "/metrics").text:
            break
        time.sleep(0.1)
    assert 'archon_requests_total{model="fake",status="499"} 1.0' in httpx.get(srv.url + "/metrics").text
    assert up.requests[0].aborted
