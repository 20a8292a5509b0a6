"""Trace store (/v1/traces), stream_trace events through the official openai SDK, the architecture endpoints."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.conftest import fake_config


def _client(server, **kw):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def test_kept_traces_listed_and_fetched_by_response_id(upstream_factory, server_factory):
    up = upstream_factory(latency=0.02)
    srv = server_factory(fake_config(up.url, keep_traces=2))
    c = _client(srv)
    ids = [c.chat.completions.create(model="archon-rank-critic-fuse" if i == 1 else "self-moa", max_tokens=20,
                                     messages=[{"role": "user", "content": f"question {i}"}]).id for i in range(3)]
    listing = httpx.get(srv.url + "/v1/traces").json()
    assert listing["keep_traces"] == 2
    assert [t["id"] for t in listing["data"]] == [ids[2], ids[1]]  # newest first, bounded: the oldest is gone
    assert httpx.get(srv.url + f"/v1/traces/{ids[0]}").status_code == 404
    item = httpx.get(srv.url + f"/v1/traces/{ids[1]}").json()
    assert item["status"] == "ok" and item["prompt"] == "question 1" and item["answers"]
    tr = item["trace"]
    assert tr["calls"] == 11 and listing["data"][1]["calls"] == 11
    gen, rank = tr["layers"][0], tr["layers"][1]
    assert gen["candidates_out"] == 8 and len(gen["candidates"]) == 8 and all(x["text"] for x in gen["candidates"])
    # the ranker kept 5 of 8; the fake upstream ranks in reverse, so the last candidates come first
    assert rank["kept"] == [7, 6, 5, 4, 3] and [x["score"] for x in rank["candidates"]] == [8.0, 7.0, 6.0, 5.0, 4.0]
    calls = [call for layer in tr["layers"] for call in layer["calls"]]
    assert sorted(call["id"] for call in calls) == list(range(1, len(calls) + 1))
    starts = [layer["start_s"] for layer in tr["layers"]]
    assert starts == sorted(starts) and all(call["start_s"] >= 0 for call in calls)
    for a, b in zip(tr["layers"], tr["layers"][1:]):  # every call of a layer starts after the layer before ended
        assert min(call["start_s"] for call in b["calls"]) >= max(call["start_s"] + call["latency_s"] for call in a["calls"]) - 1e-3


def test_failed_request_is_kept_with_its_failures(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"fault": "500"})
    srv = server_factory(fake_config(up.url))
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "self-moa", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 502
    [summary] = httpx.get(srv.url + "/v1/traces").json()["data"]
    assert summary["status"] == "error" and summary["http_status"] == 502 and "layer 0" in summary["error"]
    item = httpx.get(srv.url + f"/v1/traces/{summary['id']}").json()
    call = item["trace"]["layers"][0]["calls"][0]
    assert call["ok"] is False and "500" in call["error"]


def test_keep_traces_zero_keeps_nothing(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url, keep_traces=0))
    r = _client(srv).chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "x"}])
    listing = httpx.get(srv.url + "/v1/traces").json()
    assert listing == {"object": "list", "keep_traces": 0, "data": []}
    got = httpx.get(srv.url + f"/v1/traces/{r.id}")
    assert got.status_code == 404 and "keep_traces is 0" in got.json()["error"]["message"]


@pytest.mark.parametrize("model", ["self-moa", "archon-rank-critic-fuse"])
def test_stream_trace_events_parse_with_the_openai_sdk(upstream_factory, server_factory, model):
    up = upstream_factory(lambda b: {"text": "alpha beta gamma delta", "token_delay": 0.01} if b.get("stream") else None)
    srv = server_factory(fake_config(up.url))
    c = _client(srv)
    chunks = list(c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=20,
        stream_options={"include_usage": True}, extra_body={"stream_trace": True, "return_trace": True}))
    assert all(isinstance(ch, openai.types.chat.ChatCompletionChunk) for ch in chunks)
    events = [ch.model_extra["trace_event"] for ch in chunks if (ch.model_extra or {}).get("trace_event")]
    assert all(ch.choices == [] for ch in chunks if (ch.model_extra or {}).get("trace_event"))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "alpha beta gamma delta"
    trace = chunks[-1].model_extra["trace"]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "run_started" and events[0]["graph"][0][0]["type"] == "generator"
    assert kinds.count("layer_started") == kinds.count("layer_ended") == len(trace["layers"])
    assert [e["layer"] for e in events if e["type"] == "layer_ended"] == list(range(len(trace["layers"])))
    assert [e["candidates_out"] for e in events if e["type"] == "layer_ended"] == [la["candidates_out"] for la in trace["layers"]]
    started = {e["call"]: e for e in events if e["type"] == "call_started"}
    ended = {e["call"]: e for e in events if e["type"] == "call_ended"}
    assert set(started) == set(ended) and len(ended) == sum(len(la["calls"]) for la in trace["layers"])
    for cid, e in ended.items():
        at = [i for i, ev in enumerate(events) if ev.get("call") == cid]
        assert [events[i]["type"] for i in at] == ["call_started", "call_ended"]  # each call appears, then fills in
        assert e["ok"] and e["latency_s"] >= 0 and e["model"] and "prompt_tokens" in e
    assert chunks[-1].usage.total_tokens == trace["usage"]["total_tokens"]
    # the final stage streamed its tokens while its call was in flight: text chunks sit between its start and end
    if model == "self-moa":
        last = max(ended)
        order = [("e", ch.model_extra["trace_event"]) if (ch.model_extra or {}).get("trace_event") else ("t", ch) for ch in chunks]
        i_start = next(i for i, (k, v) in enumerate(order) if k == "e" and v["type"] == "call_started" and v["call"] == last)
        i_end = next(i for i, (k, v) in enumerate(order) if k == "e" and v["type"] == "call_ended" and v["call"] == last)
        assert any(k == "t" and v.choices and v.choices[0].delta.content for k, v in order[i_start:i_end])
    # without the flag: no events
    plain = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], stream=True))
    assert not any((ch.model_extra or {}).get("trace_event") for ch in plain)


def test_architecture_endpoints(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    schema = httpx.get(srv.url + "/v1/architectures/schema").json()
    assert "layers" in schema["properties"]
    good = httpx.post(srv.url + "/v1/architectures/validate", json={"text": "name: x\nlayers:\n  - - {type: generator, model: default, samples: 3}\n"}).json()
    assert good["valid"] and good["graph"] == [[{"id": "generator0", "type": "generator", "models": ["default"], "samples": 3}]]
    bad = httpx.post(srv.url + "/v1/architectures/validate", json={"text": "name: x\nlayers:\n  - - {type: generator, model: default}\n  - - {type: ranker, model: judge, top_k: 0}\n"}).json()
    assert not bad["valid"] and any(e.startswith("layers[1][0].top_k") for e in bad["errors"])
    assert not httpx.post(srv.url + "/v1/architectures/validate", json={"text": "layers: [[{"}).json()["valid"]
    one = httpx.get(srv.url + "/v1/architectures/self-moa").json()
    assert one["name"] == "self-moa" and "generator" in one["yaml"]
    assert httpx.get(srv.url + "/v1/architectures/nope").status_code == 404


def test_keys_guard_traces_but_not_the_console_page(upstream_factory, server_factory, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k-console-1\n")
    up = upstream_factory()
    srv = server_factory(fake_config(up.url, api_keys_file=str(keys), api_keys_env=None))
    for path in ("/ui", "/ui/", "/ui/app.js", "/ui/style.css"):  # the page holds no data: it loads, then asks for a key
        r = httpx.get(srv.url + path, follow_redirects=True)
        assert r.status_code == 200 and r.text, path
    assert "text/html" in httpx.get(srv.url + "/ui/").headers["content-type"]
    assert httpx.get(srv.url + "/ui/nope.js").status_code == 404
    auth = {"Authorization": "Bearer k-console-1"}
    for path in ("/v1/traces", "/v1/traces/x", "/v1/architectures/schema", "/v1/architectures/self-moa"):
        assert httpx.get(srv.url + path).status_code == 401, path
    assert httpx.post(srv.url + "/v1/architectures/validate", json={"text": "x"}).status_code == 401
    r = httpx.post(srv.url + "/v1/chat/completions", headers=auth, json={"model": "self-moa", "messages": [{"role": "user", "content": "q"}]})
    assert httpx.get(srv.url + f"/v1/traces/{r.json()['id']}", headers=auth).json()["status"] == "ok"


def test_a_failed_request_keeps_how_long_it_ran(upstream_factory, server_factory):
    """The trace's latency is set however the run ended (the console showed "failed (502) 0 ms")."""
    up = upstream_factory(lambda b: {"fault": "500", "latency": 0.1})
    srv = server_factory(fake_config(up.url))
    httpx.post(srv.url + "/v1/chat/completions", json={"model": "self-moa", "messages": [{"role": "user", "content": "x"}]})
    [summary] = httpx.get(srv.url + "/v1/traces").json()["data"]
    item = httpx.get(srv.url + f"/v1/traces/{summary['id']}").json()
    assert item["trace"]["latency_s"] >= item["trace"]["layers"][0]["latency_s"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_refused_as_not_json_is_kept_with_its_trace(upstream_factory, server_factory, stream):
    """A 422 (the answer was not the JSON asked for) is what a developer needs to look at: it is kept, with the
    answer that failed in its trace."""
    up = upstream_factory(lambda b: {"text": "not json at all"})
    srv = server_factory(fake_config(up.url))
    body = {"model": "self-moa", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}, "stream": stream}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
        text = r.read().decode()
    assert (r.status_code == 422) if not stream else ("invalid_structured_output" in text)
    [summary] = httpx.get(srv.url + "/v1/traces").json()["data"]
    assert summary["http_status"] == 422 and "not valid JSON" in summary["error"]
    item = httpx.get(srv.url + f"/v1/traces/{summary['id']}").json()
    assert item["trace"]["layers"][-1]["candidates"][0]["text"] == "not json at all"


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_the_client_left_is_kept_with_what_it_did(upstream_factory, server_factory, stream):
    """A client that gives up (499) left a trace of the calls that ran until then."""
    up = upstream_factory(lambda b: {"latency": 5.0} if "synthesize" in json.dumps(b).lower() else None)
    srv = server_factory(fake_config(up.url))
    body = {"model": "self-moa", "messages": [{"role": "user", "content": "x"}], "stream": stream}
    # The client leaves after 2 s of silence: time for the samples to finish on a loaded machine (1 s was the whole
    # margin), and the aggregation, 5 s long, still running (the server's keep-alive comes every 5 s).
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=2.0)) as r:
            for _ in r.iter_raw():
                pass
    for _ in range(300):  # up to 30 s on a loaded machine; at once when it is kept
        data = httpx.get(srv.url + "/v1/traces").json()["data"]
        if data:
            break
        time.sleep(0.1)
    [summary] = data
    assert summary["http_status"] == 499 and summary["error"] == "client disconnected"
    item = httpx.get(srv.url + f"/v1/traces/{summary['id']}").json()
    assert item["trace"]["layers"][0]["calls"][0]["ok"] is True  # the samples ran; the aggregation was cut off
