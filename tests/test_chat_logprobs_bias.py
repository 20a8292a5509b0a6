"""Chat logprobs in streams (and their UTF-8 bytes), and logit_bias: through the official SDK against the real server
(uvicorn) over scripted upstreams, and end to end on the embedded model (`archon serve`, default config)."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from conftest import fake_config

from archon_server.testing.server import serve_process

ROOT = Path(__file__).resolve().parent.parent


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def chat_pieces(stream) -> list[tuple[str, list]]:
    """(content, logprobs.content) of every chunk with either."""
    out = []
    for ch in stream:
        for c in ch.choices:
            lps = c.logprobs.content if c.logprobs is not None else None
            if c.delta.content or lps:
                out.append((c.delta.content or "", lps or []))
    return out


@pytest.mark.parametrize("model", ["default", "self-moa"])
def test_a_streamed_chat_forwards_the_upstreams_logprobs(upstream_factory, server_factory, model):
    """On a backend alias and through an architecture whose final stage streams: every piece comes with the
    upstream's logprobs of its tokens (they had been dropped), bytes filled as OpenAI fills them."""
    up = upstream_factory(lambda body: {"text": "one two three"} if body.get("stream") else None)
    c = client(server_factory(fake_config(up.url)))
    pieces = chat_pieces(c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], stream=True,
                                                   logprobs=True, top_logprobs=1))
    assert [p for p, _ in pieces] == ["one", " two", " three"]
    for text, lps in pieces:
        assert [t.token for t in lps] == [text] and lps[0].logprob == -0.25 and lps[0].bytes == list(text.encode())
        assert [(a.token, a.logprob, a.bytes) for a in lps[0].top_logprobs] == [(text, -0.25, list(text.encode()))]
    assert up.requests[-1].body["logprobs"] is True and up.requests[-1].body["top_logprobs"] == 1
    # without logprobs asked for, no chunk carries any
    plain = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], stream=True)
    assert all(ch.choices[0].logprobs is None for ch in plain if ch.choices)


def test_chat_logprobs_carry_the_tokens_utf8_bytes(upstream_factory, server_factory):
    up = upstream_factory(lambda body: {"text": "café au lait"})
    r = client(server_factory(fake_config(up.url))).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=1)
    lps = r.choices[0].logprobs.content
    assert [t.bytes for t in lps] == [list(w.encode()) for w in ("café", "au", "lait")]
    assert lps[0].bytes == [99, 97, 102, 195, 169] and lps[0].top_logprobs[0].bytes == lps[0].bytes


def test_logit_bias_reaches_the_final_stage_and_is_checked(upstream_factory, server_factory):
    up = upstream_factory()
    c = client(server_factory(fake_config(up.url)))
    c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "x"}], logit_bias={"42": 5, "7": -250})
    assert "logit_bias" not in up.requests[0].body  # inner layers keep their own sampling
    assert up.requests[1].body["logit_bias"] == {"42": 5.0, "7": -100.0}  # clamped to [-100, 100], as vLLM does
    c.completions.create(model="default", prompt="x", logit_bias={"3": 1})
    assert up.requests[2].body["logit_bias"] == {"3": 1.0}
    c.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], logit_bias={})
    assert "logit_bias" not in up.requests[3].body  # empty: nothing to change, nothing sent
    for bad in ({"abc": 1}, {"-4": 1}):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], logit_bias=bad)
        assert "logit_bias" in e.value.body["message"]
    assert len(up.requests) == 4


def test_logit_bias_on_a_final_backend_that_cannot_honour_it_is_refused(upstream_factory):
    from archon_server.api.app import build_app
    from archon_server.backends.registry import build_registry
    from archon_server.testing.server import ServerThread

    up = upstream_factory()
    config = fake_config(up.url)
    registry = build_registry(config)
    registry.get("default").sampling_extras = frozenset({"top_k"})
    with ServerThread(build_app(config, registry=registry)) as srv:
        c = client(srv)
        for call in (lambda: c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "x"}], logit_bias={"1": 2}),
                     lambda: c.completions.create(model="default", prompt="x", logit_bias={"1": 2})):
            with pytest.raises(openai.BadRequestError) as e:
                call()
            assert e.value.body["param"] == "logit_bias" and "model 'default'" in e.value.body["message"]
    assert not up.requests


# -- end to end on the embedded model
@pytest.fixture(scope="module")
def served():
    log = ROOT / ".pytest_cache" / "e2e-chat-logprobs-serve.log" if (ROOT / ".pytest_cache").is_dir() else None
    with serve_process(["serve"], log=log, cwd=str(ROOT)) as (_proc, url):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.mark.e2e
@pytest.mark.parametrize("model", ["smollm2", "self-moa"])
def test_a_streamed_chat_carries_logprobs_per_chunk(served, model):
    msgs = [{"role": "user", "content": "hi"}]
    pieces, lps = [], []
    for ch in served.chat.completions.create(model=model, messages=msgs, stream=True, logprobs=True, top_logprobs=2, max_tokens=8, seed=5):
        for c in ch.choices:
            if c.logprobs is not None:
                lps += c.logprobs.content
                assert c.logprobs.content  # a chunk with logprobs has its tokens' entries
            pieces.append(c.delta.content or "")
    text = "".join(pieces)
    assert lps and "".join(t.token for t in lps).startswith(text)  # (a held-back stop string aside, the tokens are the text)
    for t in lps:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode("utf-8", "replace")) and len(t.top_logprobs) == 2
    # the same request unstreamed: the same tokens (same seed, same text)
    whole = served.chat.completions.create(model=model, messages=msgs, logprobs=True, top_logprobs=2, max_tokens=8, seed=5).choices[0]
    assert whole.message.content == text and [t.token for t in whole.logprobs.content] == [t.token for t in lps]
    assert [t.bytes for t in whole.logprobs.content] == [t.bytes for t in lps]


@pytest.mark.e2e
def test_logit_bias_on_the_embedded_engine(served):
    first = served.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=1, logprobs=0, temperature=0)
    paris = first.choices[0].logprobs.tokens[0]
    assert paris == " Paris"
    banned = served.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=1, temperature=0,
                                       logit_bias={"7042": -100})  # " Paris" (SmolLM2's id)
    assert banned.choices[0].text != " Paris"
    forced = served.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
                                            logit_bias={"7042": 100})
    assert forced.choices[0].message.content == " Paris Paris Paris"
    with pytest.raises(openai.BadRequestError) as e:
        served.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=3, logit_bias={"999999": 1})
    assert "logit_bias" in e.value.body["message"] and "999999" in e.value.body["message"]
    url = str(served.base_url.join("/health"))
    assert httpx.get(url).status_code == 200
