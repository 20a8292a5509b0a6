"""A multi-prompt /v1/completions request on an architecture that fails (or that its client left) keeps, in /v1/traces (one trace per request
id), every prompt's calls, merged into its one trace as a finished request's are; it kept only the failed prompt's.
Through the official SDK against the real server (uvicorn) over a scripted upstream."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from conftest import fake_config


def script(body):  # type: ignore[no-untyped-def]
    text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
    if "BAD" in text:
        return {"fault": "400", "message": "prompt refused"}
    return {"latency": 0.5}  # still running when the other prompt fails: cancelled then, or done on a slow machine


def test_a_failed_multi_prompt_request_keeps_every_prompts_calls(upstream_factory, server_factory):
    up = upstream_factory(script)
    srv = server_factory(fake_config(up.url))
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="self-moa", prompt=["a good question", "a BAD question"], max_tokens=8)
    [summary] = httpx.get(srv.url + "/v1/traces").json()["data"]
    item = httpx.get(srv.url + f"/v1/traces/{summary['id']}").json()
    assert item["status"] == "error" and item["http_status"] == 400
    assert [m["content"] for m in item["messages"]] == ["a good question", "a BAD question"]
    layers = item["trace"]["layers"]
    calls = [call for layer in layers for call in layer["calls"]]
    statuses = {call["status"] for call in calls}
    # the failed prompt's refused call, and the other prompt's call(s): cancelled when the failure came, or finished
    assert "invalid" in statuses and statuses & {"ok", "cancelled"}
    assert len(layers) >= 2 and item["trace"]["calls"] == len(calls) >= 2


def test_a_streamed_multi_prompt_request_the_client_left_keeps_every_prompts_calls(upstream_factory, server_factory):
    """Streamed, several prompts, the client gone after the first bytes: a 499 trace holding both prompts' calls. The
    stream kept its trace at once, before the cancelled run had put the merged one in the request's slot: none."""
    up = upstream_factory(lambda b: {"latency": 2.0})
    srv = server_factory(fake_config(up.url))
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    stream = c.completions.create(model="self-moa", prompt=["a", "b"], max_tokens=8, stream=True, echo=True)
    first = next(iter(stream))  # an echoed prompt: the runs are still waiting for the upstream
    assert first.choices[0].text in ("a", "b")
    stream.close()
    for _ in range(300):  # up to 30 s on a loaded machine; at once when it is kept
        data = httpx.get(srv.url + "/v1/traces").json()["data"]
        if data:
            break
        time.sleep(0.1)
    [summary] = data
    assert summary["http_status"] == 499 and summary["error"] == "client disconnected"
    item = httpx.get(srv.url + f"/v1/traces/{summary['id']}").json()
    assert [m["content"] for m in item["messages"]] == ["a", "b"]
    layers = item["trace"]["layers"]
    calls = [call for layer in layers for call in layer["calls"]]
    # each prompt's first layer, with its calls cut off by the client's leaving
    assert [layer["index"] for layer in layers] == [0, 0]
    assert all(layer["calls"] for layer in layers) and {call["status"] for call in calls} == {"cancelled"}
    assert item["trace"]["calls"] == len(calls)
