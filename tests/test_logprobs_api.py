"""/v1/completions: legacy logprobs in streams, an upstream's echoed prompt logprobs, max_tokens 0, and the request
deadline on a backend alias - through the official SDK against the real server (uvicorn) over scripted upstreams."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import ROOT, fake_config

from archon_server.backends.http import _parse_logprobs
from archon_server.config import PRESET_ALIASES, ServerConfig


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_streamed_completions_carry_legacy_logprobs_with_text_offsets(upstream_factory, server_factory):
    up = upstream_factory(lambda body: {"text": "four five"})
    c = client(server_factory(fake_config(up.url)))
    prompt = "Say:"
    chunks = [ch.choices[0] for ch in c.completions.create(model="default", prompt=prompt, stream=True, echo=True, logprobs=1, max_tokens=4)
              if ch.choices and ch.choices[0].text]
    assert [ch.text for ch in chunks] == [prompt, "four", " five"]
    echoed = chunks[0].logprobs
    assert echoed.tokens == [prompt] and echoed.token_logprobs == [None] and echoed.top_logprobs == [None] and echoed.text_offset == [0]
    assert [ch.logprobs.text_offset for ch in chunks[1:]] == [[len(prompt)], [len(prompt) + 4]]  # where each piece starts
    assert [ch.logprobs.token_logprobs for ch in chunks[1:]] == [[-0.25], [-0.25]]
    assert [ch.logprobs.top_logprobs for ch in chunks[1:]] == [[{"four": -0.25}], [{" five": -0.25}]]
    body = up.requests[-1].body
    assert body["echo"] is True and body["logprobs"] == 1 and body["stream"] is True
    # through an architecture (the final stage streams; the server echoes): offsets count the echoed prompt
    arch = [ch.choices[0] for ch in c.completions.create(model="self-moa", prompt=prompt, stream=True, echo=True, logprobs=1)
            if ch.choices and ch.choices[0].text]
    assert arch[0].text == prompt and arch[0].logprobs is None
    assert [ch.logprobs.text_offset for ch in arch[1:]] == [[len(prompt)], [len(prompt) + 4]]


def test_an_upstreams_echoed_prompt_keeps_its_null_first_logprob():
    lps = _parse_logprobs({"tokens": ["The", " cat"], "token_logprobs": [None, -1.5], "top_logprobs": [None, {" cat": -1.5, " dog": -2.0}],
                           "text_offset": [0, 3]})
    assert [(t.token, t.logprob, t.top) for t in lps] == [("The", None, None), (" cat", -1.5, [(" cat", -1.5), (" dog", -2.0)])]


def test_max_tokens_zero_is_served_with_echo_only(upstream_factory, server_factory):
    up = upstream_factory()
    c = client(server_factory(fake_config(up.url)))
    with pytest.raises(openai.BadRequestError) as e:  # vLLM: max_tokens must be at least 1
        c.completions.create(model="default", prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens" and "echo" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # an architecture writes an answer: there is no prompt scoring to return
        c.completions.create(model="self-moa", prompt="x", max_tokens=0, echo=True)
    assert e.value.body["param"] == "max_tokens"
    for bad in ({"max_tokens": 0, "echo": True}, {"max_tokens": 0}):  # the model is resolved first: an unknown one is a 404
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="foo", prompt="x", **bad)
        assert e.value.body["code"] == "model_not_found", e.value.body
    assert not up.requests
    c.completions.create(model="default", prompt="x", max_tokens=0, echo=True, logprobs=1)  # an upstream does it itself
    assert up.requests[-1].body["max_tokens"] == 0 and up.requests[-1].body["echo"] is True


def deadline_config(url: str, request_timeout_s: float) -> ServerConfig:
    """fake_config with an upstream read timeout far past the request's deadline: only the deadline can stop a call."""
    return ServerConfig.model_validate({
        "backends": [{"alias": "fake", "kind": "openai", "model": "fake-model", "urls": [url], "aliases": PRESET_ALIASES,
                      "max_retries": 0, "read_timeout_s": 120}],
        "architectures_dirs": [str(ROOT / "architectures")],
        "server": {"request_timeout_s": request_timeout_s},
    })


def test_completions_on_a_backend_alias_keep_the_request_deadline(upstream_factory, server_factory):
    """request_timeout_s 1 against an upstream answering in 4 s: a 504 on /v1/completions as on chat (it had waited
    for the upstream and answered 200), streamed or not, and the upstream call is let go."""
    up = upstream_factory(lambda body: {"latency": 4})
    srv = server_factory(deadline_config(up.url, 1))
    with httpx.Client(base_url=srv.url, timeout=30) as h:
        chat = h.post("/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "x"}]})
        assert chat.status_code == 504
        r = h.post("/v1/completions", json={"model": "default", "prompt": "x", "max_tokens": 4})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error", r.text
        assert "deadline of 1s" in r.json()["error"]["message"]
        s = h.post("/v1/completions", json={"model": "default", "prompt": "x", "max_tokens": 4, "stream": True})
        events = [line for line in s.text.splitlines() if line.startswith("data: ")]
        assert '"timeout_error"' in events[-2] and events[-1] == "data: [DONE]", s.text
        assert not any('"text"' in e for e in events)


def test_legacy_top_logprobs_always_hold_the_chosen_token():
    """OpenAI: "the API will always return the logprob of the sampled token, so there may be up to logprobs+1
    elements"; vLLM's legacy dicts hold it too. A chosen token outside the top alternatives is added, once."""
    from archon_server.api.logprobs import legacy_logprobs
    from archon_server.backends.base import TokenLogprob

    out = legacy_logprobs([TokenLogprob("a", -1.0, [("b", -0.5)]), TokenLogprob("b", -0.5, [("b", -0.5)]),
                           TokenLogprob("c", None, None), TokenLogprob("d", -2.0, [])], 0)
    assert out["top_logprobs"] == [{"b": -0.5, "a": -1.0}, {"b": -0.5}, None, {"d": -2.0}]


def test_responses_logprobs_shape_lives_with_the_other_shapes():
    """The Responses API's output_text logprobs come from api/logprobs.py, as chat's and the legacy shape do (bytes: the
    token's UTF-8, as in chat); a position without alternatives (an echoed prompt's first token) has an empty list."""
    import archon_server.api.responses.serving as responses
    from archon_server.api.logprobs import chat_logprobs, responses_logprobs
    from archon_server.backends.base import TokenLogprob

    lps = [TokenLogprob("é", -0.5, [("é", -0.5), ("e", -1.25)]), TokenLogprob("x", None, None)]
    assert responses_logprobs(lps) == [
        {"token": "é", "bytes": [195, 169], "logprob": -0.5,
         "top_logprobs": [{"token": "é", "bytes": [195, 169], "logprob": -0.5}, {"token": "e", "bytes": [101], "logprob": -1.25}]},
        {"token": "x", "bytes": [120], "logprob": None, "top_logprobs": []},
    ]
    assert responses_logprobs(None) == [] and responses_logprobs([]) == []
    assert [t["bytes"] for t in responses_logprobs(lps)] == [t["bytes"] for t in chat_logprobs(lps)["content"]]
    assert not hasattr(responses, "_logprobs")  # one formatter, not a second copy
