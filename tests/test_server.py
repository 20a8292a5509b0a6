"""The real server (uvicorn on a free port) driven by the official openai SDK over scripted upstream HTTP servers."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from conftest import fake_config


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def test_self_moa_answer_usage_trace_and_n_as_one_request(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    r = client(srv).chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "Hi?"}], extra_body={"return_trace": True})
    assert r.choices[0].message.content == "fused answer from 6 responses"
    assert r.choices[0].finish_reason == "stop"
    # Two upstream requests: the 6 samples as ONE n=6 request, then the fuser.
    assert [q.body.get("n") for q in up.requests] == [6, 1]
    # Usage is the sum over sub-calls (the fake reports 10 prompt + 5/choice completion tokens).
    assert r.usage.prompt_tokens == 20 and r.usage.completion_tokens == 35 and r.usage.total_tokens == 55
    trace = r.model_extra["trace"]
    assert trace["calls"] == 2 and [len(layer["calls"]) for layer in trace["layers"]] == [1, 1]
    assert trace["layers"][0]["candidates_out"] == 6 and trace["layers"][1]["candidates_out"] == 1


def test_client_params_apply_to_final_stage_only(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    r = client(srv).chat.completions.create(
        model="self-moa", messages=[{"role": "user", "content": "Hi"}], n=2, temperature=0.1, max_tokens=17, stop=["END"], seed=5
    )
    assert len(r.choices) == 2
    gen, fuse = up.requests[0].body, up.requests[1].body
    assert gen["temperature"] == 0.7 and gen["max_tokens"] == 256 and "stop" not in gen
    assert fuse["n"] == 2 and fuse["temperature"] == 0.1 and fuse["max_tokens"] == 17 and fuse["stop"] == ["END"] and fuse["seed"] == 5


def test_streaming_sends_final_stage_tokens_as_produced(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"text": "one two three four five six", "token_delay": 0.02} if b.get("stream") else None)
    srv = server_factory(fake_config(up.url))
    stream = client(srv).chat.completions.create(
        model="self-moa", messages=[{"role": "user", "content": "Hi"}], stream=True, stream_options={"include_usage": True}
    )
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                deltas.append(c.delta.content)
            finish = c.finish_reason or finish
    assert "".join(deltas) == "one two three four five six"
    assert len(deltas) >= 6  # token by token, not one chunk at the end
    assert finish == "stop" and usage is not None and usage.total_tokens > 0
    assert up.requests[-1].body["stream"] is True and up.requests[0].body.get("stream") is False


async def test_async_client_concurrent_requests(upstream_factory, server_factory):
    up = upstream_factory(latency=0.05)
    srv = server_factory(fake_config(up.url))
    ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    rs = await asyncio.gather(*(ac.chat.completions.create(model="moa-lite", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(8)))
    assert all(r.choices[0].message.content == "fused answer from 6 responses" for r in rs)
    stream = await ac.chat.completions.create(model="best-of-n", messages=[{"role": "user", "content": "q"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("answer ")  # best-of-n's final stage (ranker) is not streamable: the answer comes whole
    await ac.close()


def test_partial_failure_is_tolerated_and_recorded(upstream_factory, server_factory):
    calls = {"n": 0}

    def script(body):
        # the second proposer always fails (500), everything else answers
        if "synthesize" not in json.dumps(body):
            calls["n"] += 1
            if calls["n"] == 2:
                return {"fault": "500"}
        return None

    up = upstream_factory(script)
    cfg = fake_config(up.url)
    cfg.backends[0].max_retries = 0
    srv = server_factory(cfg)
    r = client(srv).chat.completions.create(model="moa-lite", messages=[{"role": "user", "content": "Q"}], extra_body={"return_trace": True})
    assert r.choices[0].message.content == "fused answer from 5 responses"
    layer0 = r.model_extra["trace"]["layers"][0]
    assert sum(not c["ok"] for c in layer0["calls"]) == 1 and layer0["failures"]


def test_all_backends_failing_gives_502_in_openai_schema(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"fault": "500"})
    cfg = fake_config(up.url)
    cfg.backends[0].max_retries = 0
    srv = server_factory(cfg)
    with pytest.raises(openai.APIStatusError) as e:
        client(srv).chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "Q"}])
    assert e.value.status_code == 502
    body = e.value.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}


def test_retries_on_429_then_succeeds(upstream_factory, server_factory):
    seen = {"n": 0}

    def script(body):
        seen["n"] += 1
        return {"fault": "429"} if seen["n"] == 1 else None

    up = upstream_factory(script)
    srv = server_factory(fake_config(up.url))
    r = client(srv).chat.completions.create(model="fake", messages=[{"role": "user", "content": "Q"}])
    assert r.choices[0].message.content.startswith("answer 0") and seen["n"] == 2


@pytest.mark.parametrize("fault", ["reset", "invalid_json", "wrong_n"])
def test_malformed_upstream_answers_are_retried_then_reported(upstream_factory, server_factory, fault):
    up = upstream_factory(lambda b: {"fault": fault})
    srv = server_factory(fake_config(up.url))
    with pytest.raises(openai.APIStatusError) as e:
        client(srv).chat.completions.create(model="fake", messages=[{"role": "user", "content": "Q"}], n=2)
    assert e.value.status_code == 502
    assert len(up.requests) == 2  # first try + one retry (max_retries=1)


def test_truncated_stream_is_an_error_event_not_a_silent_cut(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"fault": "truncated", "text": "a b c d e f"} if b.get("stream") else None)
    srv = server_factory(fake_config(up.url))
    with pytest.raises(openai.APIError):
        for _ in client(srv).chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "Q"}], stream=True):
            pass


def test_deadline_gives_504(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"fault": "hang"})
    srv = server_factory(fake_config(up.url, request_timeout_s=1.0))
    t0 = time.time()
    with pytest.raises(openai.APIStatusError) as e:
        client(srv).chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "Q"}])
    assert e.value.status_code == 504 and time.time() - t0 < 10
    deadline = time.time() + 30  # (a loaded machine may take seconds to get there; done at once when it is)
    while time.time() < deadline and not all(q.aborted for q in up.requests):
        time.sleep(0.05)
    assert up.requests and all(q.aborted for q in up.requests)  # the upstream saw its request aborted


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_upstream_calls(upstream_factory, server_factory, stream):
    up = upstream_factory(lambda b: {"fault": "hang"})
    srv = server_factory(fake_config(up.url))
    with pytest.raises(httpx.TimeoutException):  # after 2 s: the 6 upstream calls are out by then, also under load
        with httpx.Client(timeout=2.0) as h:
            r = h.post(srv.url + "/v1/chat/completions", json={"model": "moa-lite", "stream": stream, "messages": [{"role": "user", "content": "Q"}]})
            if stream:
                for _ in r.iter_lines():
                    pass
    deadline = time.time() + 30  # (a loaded machine may take seconds to get there; done at once when it is)
    while time.time() < deadline and not (len(up.requests) == 6 and all(q.aborted for q in up.requests)):
        time.sleep(0.05)
    assert len(up.requests) == 6 and all(q.aborted for q in up.requests)


def test_latency_is_the_critical_path_not_the_sum(upstream_factory, server_factory):
    up = upstream_factory(latency=0.3)
    srv = server_factory(fake_config(up.url))
    t0 = time.perf_counter()
    r = client(srv).chat.completions.create(model="moa", messages=[{"role": "user", "content": "Q"}], extra_body={"return_trace": True})
    elapsed = time.perf_counter() - t0
    assert r.model_extra["trace"]["calls"] == 13
    # The calls of a layer run at once: at the upstream, each of the two 6-call layers' calls all overlap (the
    # last one began before the first one ended), whatever the machine's load...
    calls = sorted(up.requests, key=lambda q: q.started)
    assert len(calls) == 13
    for layer in (calls[0:6], calls[6:12]):
        assert max(q.started for q in layer) < min(q.ended for q in layer), [(q.started, q.ended) for q in layer]
    # ...and the request takes the critical path, 3 layers x 0.3 s = 0.9 s, not the sum, 13 x 0.3 = 3.9 s (the bound
    # was 2.5 s: too close on a loaded machine; the overlap above is what shows the calls were concurrent).
    assert elapsed < 3.9, elapsed


def test_backend_without_n_gets_concurrent_requests(upstream_factory, server_factory):
    up = upstream_factory()
    cfg = fake_config(up.url)
    cfg.backends[0].supports_n = False
    srv = server_factory(cfg)
    r = client(srv).chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "Q"}])
    assert r.choices[0].message.content == "fused answer from 6 responses"
    assert sorted(q.body.get("n") for q in up.requests) == [1] * 7


def test_errors_use_openai_schema(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url, max_n=4, max_body_bytes=10_000))
    c = client(srv)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Q"}])
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "Q"}], temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "Q"}], n=5)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="self-moa", messages=[{"role": "wizard", "content": "Q"}])
    assert e.value.body["param"].startswith("messages[0].role")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="self-moa", messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "Q"}], extra_body={"architecture": {"layers": [[{"type": "generator", "model": "default", "samples": 0}]]}})
    assert e.value.body["param"].startswith("architecture.layers[0][0].samples")
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "x" * 20_000}])
    assert e.value.status_code == 413
    r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(srv.url + "/v1/chat/completions", content=b'{"model": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_architecture_override_and_models_health_metrics(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    r = c.chat.completions.create(
        model="self-moa", messages=[{"role": "user", "content": "Q"}],
        extra_body={"architecture": {"layers": [[{"type": "generator", "model": "default", "samples": 3}], [{"type": "fuser", "model": "aggregator"}]]}},
    )
    assert r.choices[0].message.content == "fused answer from 3 responses"
    ids = {m.id for m in c.models.list().data}
    assert {"moa", "self-moa", "archon-rank-critic-fuse", "fake", "proposer-1"} <= ids
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    m = httpx.get(srv.url + "/metrics").text
    assert 'archon_requests_total{model="self-moa",status="200"} 1.0' in m


def test_auth_with_keys(upstream_factory, server_factory, monkeypatch, tmp_path):
    monkeypatch.setenv("ARCHON_TEST_KEYS", "k1, k2")
    keyfile = tmp_path / "keys"
    keyfile.write_text("# comment\nk3\n")
    up = upstream_factory()
    srv = server_factory(fake_config(up.url, api_keys_env="ARCHON_TEST_KEYS", api_keys_file=str(keyfile)))
    with pytest.raises(openai.AuthenticationError):
        client(srv, api_key="wrong").models.list()
    assert client(srv, api_key="k2").models.list().data
    assert client(srv, api_key="k3").chat.completions.create(model="fake", messages=[{"role": "user", "content": "Q"}]).choices
    assert httpx.get(srv.url + "/health").status_code == 200
    assert httpx.get(srv.url + "/metrics").status_code == 401
    # the scheme is case-insensitive (RFC 9110): `bearer` and `BEARER` carry a key too
    for scheme in ("bearer", "BEARER"):
        assert httpx.get(srv.url + "/v1/models", headers={"authorization": f"{scheme} k1"}).status_code == 200
    assert httpx.get(srv.url + "/v1/models", headers={"authorization": "Basic k1"}).status_code == 401


def test_concurrency_limit_gives_429_quickly(upstream_factory, server_factory):
    up = upstream_factory(latency=1.0)
    srv = server_factory(fake_config(up.url, max_concurrent_requests=2))

    async def go():
        ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        res = await asyncio.gather(*(ac.chat.completions.create(model="fake", messages=[{"role": "user", "content": "Q"}]) for _ in range(5)), return_exceptions=True)
        await ac.close()
        return res

    res = asyncio.run(go())
    assert sum(isinstance(r, openai.RateLimitError) for r in res) == 3
    assert sum(not isinstance(r, Exception) for r in res) == 2


def test_greedy_n_is_asked_once_and_copied(upstream_factory, server_factory):
    # vLLM answers 400 to n>1 with temperature 0; identical samples need one request.
    up = upstream_factory(lambda b: {"fault": "400"} if b.get("n", 1) > 1 and b.get("temperature") == 0 else None)
    srv = server_factory(fake_config(up.url))
    r = client(srv).chat.completions.create(model="fake", messages=[{"role": "user", "content": "Q"}], n=3, temperature=0)
    assert [c.message.content for c in r.choices] == ["answer 0 from fake-model"] * 3 and [c.index for c in r.choices] == [0, 1, 2]
    chunks = list(client(srv).chat.completions.create(model="fake", messages=[{"role": "user", "content": "Q"}], n=2, temperature=0, stream=True))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i) for i in (0, 1)}
    assert texts[0] == texts[1] == "answer 0 from fake-model"
    assert all(q.body["n"] == 1 for q in up.requests)


def test_streamed_n_on_a_backend_without_n_sends_one_request_per_sample(upstream_factory, server_factory):
    """Regression: the streaming branch was taken before `supports_n` was checked, so `n=k` went upstream anyway."""
    up = upstream_factory(lambda b: {"text": f"sample seeded {b.get('seed')}", "token_delay": 0.01})
    cfg = fake_config(up.url)
    cfg.backends[0].supports_n = False
    srv = server_factory(cfg)
    stream = client(srv).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "Q"}], n=3, seed=10, stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    bodies = [q.body for q in up.requests]
    assert [b.get("n") for b in bodies] == [1, 1, 1] and all(b["stream"] is True for b in bodies)
    # Each request is one choice, seeds offset so the samples differ; every choice streamed and finished.
    assert texts == {0: "sample seeded 10", 1: "sample seeded 11", 2: "sample seeded 12"}
    assert finish == {0: "stop", 1: "stop", 2: "stop"}
    assert usage is not None and usage.completion_tokens > 0


def test_backend_counters_are_exported_at_scrape_time():
    """Each backend's numeric ``stats()`` becomes ``archon_backend_<name>{backend=alias}`` (a counter: ``..._total``); other values are left out."""
    from prometheus_client import generate_latest

    from archon_server.api.metrics import Metrics

    class Counting:
        def __init__(self) -> None:
            self.hits = 0

        def stats(self) -> dict:
            return {"prefix_hit_tokens": self.hits, "prefix_hit_rate": 0.5, "replicas": [{"state": "up"}], "alive": True}

    b = Counting()
    metrics = Metrics(lambda: {"smollm2": b, "plain": object()})
    b.hits = 96
    text = generate_latest(metrics.registry).decode()
    assert 'archon_backend_prefix_hit_tokens_total{backend="smollm2"} 96.0' in text
    assert 'archon_backend_prefix_hit_rate{backend="smollm2"} 0.5' in text
    assert "replicas" not in text and "alive" not in text and 'backend="plain"' not in text


def test_a_request_without_model_runs_the_default_architecture(upstream_factory, server_factory):
    """`server.default_architecture` serves a request that names no model, as vLLM serves its one model."""
    up = upstream_factory()
    srv = server_factory(fake_config(up.url, default_architecture="self-moa"))
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Q"}]})
    assert r.status_code == 200 and r.json()["model"] == "self-moa" and r.json()["choices"][0]["message"]["content"].startswith("fused")
    r = httpx.post(srv.url + "/v1/responses", json={"input": "Q"})
    assert r.status_code == 200 and r.json()["model"] == "self-moa"
    bare = server_factory(fake_config(up.url))
    r = httpx.post(bare.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Q"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_models_lists_only_architectures_the_backends_can_run(upstream_factory, server_factory, caplog):
    up = upstream_factory()
    cfg = fake_config(up.url)
    cfg.backends[0].aliases = ["default", "aggregator"]  # no judge, no proposers
    srv = server_factory(cfg)
    ids = {m.id for m in client(srv).models.list().data}
    assert {"self-moa", "self-consistency", "default"} <= ids and not ids & {"best-of-n", "moa", "moa-lite"}, ids
    assert "not served (aliases with no backend)" in caplog.text and "best-of-n (judge)" in caplog.text
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "best-of-n", "messages": [{"role": "user", "content": "Q"}]})
    assert r.status_code == 400 and "judge" in r.json()["error"]["message"]


def test_an_unknown_response_format_type_is_a_400_before_any_call(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "self-moa", "messages": [{"role": "user", "content": "Q"}],
                                                          "response_format": {"type": "xml"}})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "response_format" and "response_format.type: 'xml' is not one of" in err["message"], err
    assert up.requests == []


def test_a_deadline_names_the_configured_timeout(upstream_factory, server_factory):
    up = upstream_factory(latency=3.0)
    srv = server_factory(fake_config(up.url, request_timeout_s=1))
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "self-moa", "messages": [{"role": "user", "content": "Q"}]})
    assert r.status_code == 504 and "deadline of 1s exceeded" in r.json()["error"]["message"], r.json()


def test_a_backend_alias_refusal_reads_as_the_backend_said_it(upstream_factory, server_factory):
    """A model served straight through answers with its backend's own words, not the graph's
    ("layer 0 failed: generator0: ...; generator0: ComponentFailed: generator0: every call failed")."""
    up = upstream_factory(lambda b: {"fault": "400", "message": "This model's maximum context length is 8 tokens"})
    srv = server_factory(fake_config(up.url))
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "Q"}]})
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "maximum context length is 8 tokens" in msg and "layer 0" not in msg and "every call failed" not in msg, msg
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "self-moa", "messages": [{"role": "user", "content": "Q"}]})
    msg = r.json()["error"]["message"]  # an architecture still says which layer failed, once per cause
    assert r.status_code == 400 and msg.startswith("layer 0 failed: generator0: ") and "every call failed" not in msg, msg


def test_a_final_generator_of_several_models_streams_every_answer(upstream_factory, server_factory):
    """Its calls do not stream (several models), so its answers go out when it ends: the stream had sent none."""
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    arch = {"layers": [[{"type": "generator", "models": ["proposer-1", "proposer-2"]}]]}
    texts = {}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json={"model": "self-moa", "messages": [{"role": "user", "content": "hi"}],
                                                                     "stream": True, "architecture": arch}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
    assert texts and all(texts.values()), texts
