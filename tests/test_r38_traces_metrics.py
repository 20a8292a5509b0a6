"""Through the wire (a real uvicorn, the official openai SDK and httpx) on a scripted upstream:

* a /v1/completions trace carries the backends' speculative-decoding figures (``Trace.metrics``) as chat's does: on
  an architecture and on a backend alias, one prompt's as they are, several prompts' merged (counters summed, rates
  weighted by drafted tokens); they were ``{}``;
* a request to a backend alias that the client leaves (a stream mid-way, or a plain request) keeps its trace, a 499
  with its call ``cancelled``, as chat's and an architecture's do: /v1/completions kept none;
* /metrics counts the requests the edge refused before reading them (401 bad key, 413 body too large, 429 over
  max_concurrent_requests or the body budget, 400 text that cannot go upstream) in archon_requests_total with
  model="", as README promises of every answered generation request, and each in archon_rejected_total by reason
  (401 and 413 were counted nowhere, the edge's 429 only there).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from conftest import fake_config
from prometheus_client.parser import text_string_to_metric_families

from archon_server.testing.upstream import FakeUpstream

# What the upstream says it did, by the prompt it got (vLLM's names, as backends/http.py reads them).
FIGURES = {
    "alpha": {"num_draft_tokens": 10, "num_accepted_draft_tokens": 8, "draft_acceptance_rate": 0.8, "mean_acceptance_length": 2.6},
    "beta": {"num_draft_tokens": 30, "num_accepted_draft_tokens": 15, "draft_acceptance_rate": 0.5, "mean_acceptance_length": 1.9},
}


class SpecUpstream(FakeUpstream):
    """The fake upstream, its non-streamed answers carrying the figures of the prompt they answer."""

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        resp = await super()._chat(request)
        if not isinstance(resp, web.Response) or resp.status != 200 or resp.content_type != "application/json":
            return resp
        body = await request.json()
        text = json.dumps(body.get("messages") or body.get("prompt"))
        word = next((w for w in FIGURES if w in text), None)
        return resp if word is None else web.json_response({**json.loads(resp.body), **FIGURES[word]})


@pytest.fixture
def spec_upstream() -> Iterator[SpecUpstream]:
    up = SpecUpstream().start()
    yield up
    up.stop()


def client(srv: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)


def kept(srv: Any, rid: str) -> dict[str, Any]:
    r = httpx.get(srv.url + f"/v1/traces/{rid}")
    assert r.status_code == 200, r.text
    return r.json()


# -- 1. /v1/completions keeps Trace.metrics -------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["self-moa", "fake"])  # an architecture (two calls a prompt), a backend alias (one)
def test_a_completions_trace_has_the_metrics_a_chat_trace_has(spec_upstream, server_factory, model):
    srv = server_factory(fake_config(spec_upstream.url))
    c = client(srv)
    chat = {w: c.chat.completions.create(model=model, messages=[{"role": "user", "content": f"{w} question"}], max_tokens=8,
                                         extra_body={"return_trace": True}) for w in FIGURES}
    per_prompt = {w: r.model_extra["trace"]["metrics"] for w, r in chat.items()}
    calls = 2 if model == "self-moa" else 1  # a run's counters sum its calls'; its rates weigh them (here alike)
    for w, m in per_prompt.items():
        assert m == {k: v * calls if k.startswith("num_") else v for k, v in FIGURES[w].items()}, m
    assert kept(srv, chat["alpha"].id)["trace"]["metrics"] == per_prompt["alpha"]

    one = c.completions.create(model=model, prompt="alpha question", max_tokens=8, extra_body={"return_trace": True})
    assert one.model_extra["trace"]["metrics"] == per_prompt["alpha"]  # was {}
    assert kept(srv, one.id)["trace"]["metrics"] == per_prompt["alpha"]

    both = c.completions.create(model=model, prompt=["alpha question", "beta question"], max_tokens=8,
                                extra_body={"return_trace": True})
    merged = kept(srv, both.id)["trace"]["metrics"]
    assert merged["num_draft_tokens"] == 40 * calls and merged["num_accepted_draft_tokens"] == 23 * calls
    assert merged["draft_acceptance_rate"] == pytest.approx(23 / 40)  # the request's accepted over its drafted
    assert merged["mean_acceptance_length"] == pytest.approx((2.6 * 10 + 1.9 * 30) / 40)
    if model == "self-moa":  # the answer's own traces: one per prompt, each with its prompt's figures
        assert [t["metrics"] for t in both.model_extra["trace"]] == [per_prompt["alpha"], per_prompt["beta"]]
    else:
        assert both.model_extra["trace"]["metrics"] == merged


# -- 2. a backend alias's request the client left keeps its trace -------------------------------------------------------


def left_trace(srv: Any) -> dict[str, Any]:
    """The one kept trace, once its cut call is recorded (the stream keeps the trace as it cancels the run)."""
    for _ in range(100):
        data = httpx.get(srv.url + "/v1/traces").json()["data"]
        if data:
            item = kept(srv, data[0]["id"])
            calls = [c for layer in item["trace"]["layers"] for c in layer["calls"]]
            if calls and all(c["status"] != "ok" for c in calls):
                assert len(data) == 1, data
                return item
        time.sleep(0.1)
    raise AssertionError(f"no trace kept with its cut call: {httpx.get(srv.url + '/v1/traces').json()}")


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_stream_to_a_backend_alias_the_client_left_keeps_its_trace(upstream_factory, server_factory, endpoint):
    up = upstream_factory(lambda b: {"text": " ".join(["word"] * 400), "token_delay": 0.02})
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    if endpoint == "completions":
        stream = c.completions.create(model="fake", prompt="a question", max_tokens=400, stream=True)
    else:
        stream = c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "a question"}], max_tokens=400, stream=True)
    chunks = iter(stream)
    text = "".join((ch.choices[0].text if endpoint == "completions" else ch.choices[0].delta.content or "") for ch in
                   (next(chunks) for _ in range(5)) if ch.choices)
    assert "word" in text  # tokens came: the stream was under way
    stream.close()
    item = left_trace(srv)
    assert item["http_status"] == 499 and item["error"] == "client disconnected" and item["stream"] is True
    assert item["model"] == "fake" and item["messages"] == [{"role": "user", "content": "a question"}]
    [call] = [call for layer in item["trace"]["layers"] for call in layer["calls"]]
    assert call["status"] == "cancelled" and call["model"] == "fake" and call["ok"] is False
    assert item["trace"]["calls"] == 1 and item["trace"]["latency_s"] > 0
    assert 'archon_requests_total{model="fake",status="499"} 1.0' in httpx.get(srv.url + "/metrics").text


def test_a_plain_completion_on_a_backend_alias_the_client_left_keeps_its_trace(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"latency": 3.0})
    srv = server_factory(fake_config(up.url))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json={"model": "fake", "prompt": ["one", "two"], "max_tokens": 8}, timeout=0.7)
    item = left_trace(srv)
    assert item["http_status"] == 499 and item["stream"] is False and [m["content"] for m in item["messages"]] == ["one", "two"]
    calls = [call for layer in item["trace"]["layers"] for call in layer["calls"]]
    assert sorted(c["purpose"] for c in calls) == ["prompt 1", "prompt 2"] and {c["status"] for c in calls} == {"cancelled"}


# -- 3. the edge's refusals are counted as the requests they are ----------------------------------------------------


def counted(srv: Any, key: str) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    text = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["model"], s.labels["status"]): s.value for s in fams["archon_requests"].samples if s.name == "archon_requests_total"}
    rejected = {s.labels["reason"]: s.value for s in fams["archon_rejected"].samples if s.name == "archon_rejected_total"}
    return requests, rejected


def test_refusals_at_the_edge_are_counted_by_status_and_reason(upstream_factory, server_factory, monkeypatch):
    monkeypatch.setenv("R38_KEYS", "good-key")
    up = upstream_factory(lambda b: {"latency": 4.0} if "hold" in json.dumps(b) else None)  # under the backend read timeout of 5 s
    srv = server_factory(fake_config(up.url, api_keys_env="R38_KEYS", max_body_bytes=8000, max_inflight_body_bytes=8000,
                                     max_concurrent_requests=2))
    c = client(srv).with_options(api_key="good-key")
    q = [{"role": "user", "content": "a question"}]

    with pytest.raises(openai.AuthenticationError):  # 401 on a generation path
        client(srv).with_options(api_key="bad-key").chat.completions.create(model="fake", messages=q)
    assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer bad-key"}).status_code == 401  # not a generation
    with pytest.raises(openai.APIStatusError) as big:  # 413, announced by Content-Length
        c.completions.create(model="fake", prompt="x" * 9000, max_tokens=4)
    assert big.value.status_code == 413
    chunked = httpx.post(srv.url + "/v1/responses", headers={"Authorization": "Bearer good-key", "Content-Type": "application/json"},
                         content=iter([b'{"model": "fake", "input": "', b"y" * 9000, b'"}']))  # 413 as the bytes pass the limit
    assert chunked.status_code == 413
    nul = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": "Bearer good-key"},
                     json={"model": "fake", "messages": [{"role": "user", "content": "a\u0000b"}]})  # 400 at the edge
    assert nul.status_code == 400 and nul.json()["error"]["param"] == "messages[0].content"

    def hold() -> int:
        return c.chat.completions.with_raw_response.create(model="fake", messages=[{"role": "user", "content": "hold"}]).status_code

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(hold)
        for _ in range(500):
            if len(up.requests) >= 1:
                break
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as budget:  # 429: this body and the one in flight pass the budget
            c.completions.create(model="fake", prompt="z" * 7950, max_tokens=4)
        assert "bytes" in budget.value.message
        second = pool.submit(hold)
        for _ in range(500):
            if len(up.requests) >= 2:
                break
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as busy:  # 429 over max_concurrent_requests, before the body is read
            c.chat.completions.create(model="fake", messages=q)
        assert "in flight" in busy.value.message
        assert first.result() == second.result() == 200

    requests, rejected = counted(srv, "good-key")
    assert requests == {("", "401"): 1, ("", "413"): 2, ("", "400"): 1, ("", "429"): 2, ("fake", "200"): 2}, requests
    assert rejected == {"auth": 2, "body_size": 2, "invalid_text": 1, "body_bytes": 1, "concurrency": 1}, rejected
    assert len(up.requests) == 2  # none of the refused reached a backend


def test_merged_metrics_sums_counters_and_weighs_rates_by_what_they_average_over():
    """The one rule (components/trace.py) that a run uses for its calls and a completion for its prompts: a run
    kept the last call's rates and the last call's engine counters (target_forward_passes, emitted_tokens)."""
    from archon_server.components.trace import merged_metrics

    a = {"num_draft_tokens": 10, "draft_acceptance_rate": 0.8, "emitted_tokens": 30, "target_forward_passes": 12,
         "target_passes_per_token": 0.4, "spec_method": "ngram"}
    b = {"num_draft_tokens": 30, "draft_acceptance_rate": 0.5, "emitted_tokens": 10, "target_forward_passes": 6,
         "target_passes_per_token": 0.6, "spec_method": "ngram"}
    c = {"num_draft_tokens": 20, "draft_acceptance_rate": 0.25, "emitted_tokens": 20, "target_forward_passes": 7,
         "target_passes_per_token": 0.35, "spec_method": "eagle"}
    m = merged_metrics([a, b])
    assert m["num_draft_tokens"] == 40 and m["emitted_tokens"] == 40 and m["target_forward_passes"] == 18
    assert m["draft_acceptance_rate"] == pytest.approx((0.8 * 10 + 0.5 * 30) / 40)
    assert m["target_passes_per_token"] == pytest.approx((0.4 * 30 + 0.6 * 10) / 40)  # by tokens emitted
    assert m["spec_method"] == "ngram"
    whole = merged_metrics([a, b, c])
    assert "spec_method" not in whole  # not a number, and the parts differ
    pairwise = merged_metrics([merged_metrics([a, b]), c])  # as a run merges call after call
    assert pairwise.keys() - {"spec_method"} == whole.keys()
    assert all(pairwise[k] == pytest.approx(whole[k]) for k in whole)
    assert merged_metrics([{}, a]) == a and merged_metrics([]) == {}
