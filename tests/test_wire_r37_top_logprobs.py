"""`top_logprobs` without its switch, through the official SDK against the real server (uvicorn) over a scripted
upstream: chat's is a 400 in OpenAI's error schema (OpenAI and vLLM refuse it; it used to be ignored without a word),
while the Responses API accepts it and returns logprobs only when `include` asks for them, as OpenAI does."""

from __future__ import annotations

import openai
import pytest
from conftest import fake_config


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


MSGS = [{"role": "user", "content": "Hi?"}]


def test_chat_top_logprobs_without_logprobs_is_a_400_naming_the_param(upstream_factory, server_factory):
    up = upstream_factory()
    c = client(server_factory(fake_config(up.url)))
    for flag in ({}, {"logprobs": False}):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="default", messages=MSGS, top_logprobs=2, **flag)
        body = e.value.body
        assert body["param"] == "top_logprobs" and body["type"] == "invalid_request_error" and body["code"] == "invalid_value"
        # the validator's words, without pydantic's "Value error, " before them
        assert body["message"] == "top_logprobs: logprobs must be set to true when top_logprobs is used", body
    assert up.requests == []  # refused before anything ran
    # with the switch it is served, and top_logprobs null alone is fine (nothing asked)
    ok = c.chat.completions.create(model="default", messages=MSGS, logprobs=True, top_logprobs=1)
    assert ok.choices[0].logprobs.content[0].top_logprobs[0].token == "answer"
    plain = c.chat.completions.create(model="default", messages=MSGS, extra_body={"top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_responses_top_logprobs_alone_is_accepted_and_include_asks_for_logprobs(upstream_factory, server_factory):
    up = upstream_factory()
    c = client(server_factory(fake_config(up.url)))
    alone = c.responses.create(model="default", input="Hi?", top_logprobs=1)
    assert alone.status == "completed" and alone.output[0].content[0].logprobs == []
    assert not up.requests[-1].body.get("logprobs")
    asked = c.responses.create(model="default", input="Hi?", top_logprobs=1, include=["message.output_text.logprobs"])
    lp = asked.output[0].content[0].logprobs
    assert [t.token for t in lp] == ["answer", "0", "from", "fake-model"] and lp[0].top_logprobs[0].token == "answer"
    assert up.requests[-1].body["logprobs"] is True and up.requests[-1].body["top_logprobs"] == 1
