"""Through the wire (`archon serve`, default config: the embedded engine; the official openai SDK and raw bodies with
httpx), the 400s name the request's own field: an out-of-vocabulary logit_bias id names ``logit_bias``; a value that
fits no branch of a union names the field, not pydantic's branch (``stop``, not ``stop.str``); a context-length refusal
names the endpoint's prompt and max-tokens fields and says its word for the prompt (completions: ``prompt`` /
``max_tokens``; responses: ``input`` / ``max_output_tokens``; chat: OpenAI's ``messages``); ``stream_options`` without
``stream: true`` is vLLM's 400; NaN and the infinities are refused as not finite; and ``tools`` with
``tool_choice: "none"`` is answered as text by a model that cannot call tools."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from archon_server.testing.server import serve_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
HI = [{"role": "user", "content": "hi"}]
LONG = "hello world " * 6000  # ~12K tokens: past SmolLM2's 8,192
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log = tmp_path_factory.mktemp("r38-api-errors") / "serve.log"
    with serve_process(["serve"], log=log, cwd=str(ROOT)) as (_proc, url):
        yield url


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served + "/v1", api_key="none", max_retries=0, timeout=300)


def error(served: str, path: str, body: dict | bytes, status: int = 400) -> dict:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(served + path, content=raw, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error", err
    return err


# -- D1: logit_bias past the vocabulary ------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["smollm2", "self-moa"])  # a backend alias; an architecture whose final stage refuses it
def test_an_out_of_vocabulary_logit_bias_id_is_a_400_naming_logit_bias(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=HI, max_tokens=4, logit_bias={"99999999": 1})
    assert e.value.body["param"] == "logit_bias" and "out of the vocabulary" in e.value.body["message"], e.value.body
    if model == "smollm2":
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt="Hi", max_tokens=4, logit_bias={"99999999": 1})
        assert e.value.body["param"] == "logit_bias", e.value.body


# -- D2: a union's branch names stay out of param and message ----------------------------------------------------


@pytest.mark.parametrize("path,body,param,says", [
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "should be a string or a list of content parts"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": HI, "stop": 5}, "stop", "should be a string or a list of strings"),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "stop": {"a": 1}}, "stop", "should be a string or a list of strings"),
    ("/v1/responses", {"model": "smollm2", "input": 5}, "input", "should be a string or a list of input items"),
    # no words of our own: pydantic's, for every branch at once (the one field's error, not "1 more error")
    ("/v1/completions", {"model": "smollm2", "prompt": 5}, "prompt", "Input should be a valid string or a valid"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": HI, "tool_choice": 5}, "tool_choice", "Input should be a valid string or an object"),
    # the branch that took the value says what is wrong inside it
    ("/v1/chat/completions", {"model": "smollm2", "messages": HI, "stop": ["a", 5]}, "stop[1]", "Input should be a valid string"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text", "Input should be a valid string"),
])
def test_a_value_of_no_branch_of_a_union_names_the_field(served, path, body, param, says):
    err = error(served, path, body)
    assert err["param"] == param, err
    assert err["message"].startswith(f"{param}: ") and says in err["message"], err
    assert "more error" not in err["message"] and ".str" not in err["message"] and "list[" not in err["message"], err


# -- D3: a context-length refusal names the endpoint's fields -------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_completions_context_refusal_names_prompt_or_max_tokens(client, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt=LONG, max_tokens=4, stream=stream)
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "prompt", body
    assert "However, your prompt resulted in " in body["message"] and body["message"].endswith("Please reduce the length of the prompt."), body
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="Hi there", max_tokens=9000, stream=stream)
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "max_tokens", body
    assert "in the prompt, 9000 in the completion). Please reduce the length of the prompt or completion." in body["message"], body
    assert "messages" not in body["message"], body


@pytest.mark.parametrize("stream", [False, True])
def test_a_responses_context_refusal_names_input_or_max_output_tokens(client, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="smollm2", input=LONG, stream=stream)
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "input", body
    assert "However, your input resulted in " in body["message"] and body["message"].endswith("Please reduce the length of the input."), body
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="smollm2", input="hi", max_output_tokens=9000, stream=stream)
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "max_output_tokens", body
    assert "in the input, 9000 in the completion)" in body["message"] and "messages" not in body["message"], body


def test_a_chat_context_refusal_keeps_openais_messages(client):
    for kw in ({"messages": [{"role": "user", "content": LONG}], "max_tokens": 4}, {"messages": HI, "max_tokens": 9000}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smollm2", **kw)
        body = e.value.body
        assert body["code"] == "context_length_exceeded" and body["param"] == "messages" and "the messages" in body["message"], body


# -- D5: stream_options without stream --------------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "smollm2", "messages": HI, "max_tokens": 2}),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 2}),
])
def test_stream_options_without_stream_is_vllms_400(served, path, body):
    for stream in ({}, {"stream": False}):
        err = error(served, path, {**body, **stream, "stream_options": {"include_usage": True}})
        assert err["param"] == "stream_options" and "Stream options can only be defined when `stream=True`." in err["message"], err
    # as vLLM: an empty or null stream_options sets nothing, and with stream: true it is what it is for
    for extra in ({"stream_options": {}}, {"stream_options": None}):
        assert httpx.post(served + path, json={**body, **extra}, timeout=120).status_code == 200
    r = httpx.post(served + path, json={**body, "stream": True, "stream_options": {"include_usage": True}}, timeout=120)
    assert r.status_code == 200 and '"usage":{' in r.text


# -- D6: NaN and the infinities -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path,prefix,field,value", [
    ("/v1/chat/completions", b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}],', "temperature", b"NaN"),
    ("/v1/chat/completions", b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}],', "temperature", b"Infinity"),
    ("/v1/chat/completions", b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}],', "top_p", b"NaN"),
    ("/v1/chat/completions", b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}],', "presence_penalty", b"-Infinity"),
    ("/v1/chat/completions", b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}],', "min_p", b"NaN"),
    ("/v1/completions", b'{"model":"smollm2","prompt":"hi",', "repetition_penalty", b"Infinity"),
    ("/v1/responses", b'{"model":"smollm2","input":"hi",', "temperature", b"NaN"),
])
def test_nan_and_infinity_are_refused_as_not_finite(served, path, prefix, field, value):
    err = error(served, path, prefix + b'"' + field.encode() + b'":' + value + b"}")
    assert err["param"] == field and err["message"] == f"{field}: Input should be a finite number", err


def test_a_nan_logit_bias_is_refused_not_clamped(served):
    err = error(served, "/v1/chat/completions", b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}],"logit_bias":{"5":NaN}}')
    assert err["param"] == "logit_bias.5" and "finite number" in err["message"], err


# -- D7: tools with tool_choice "none" --------------------------------------------------------------------------------


def test_tools_with_tool_choice_none_are_answered_as_text_by_a_model_that_cannot_call_tools(client):
    r = client.chat.completions.create(model="smollm2", messages=HI, max_tokens=4, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(model="smollm2", messages=HI, max_tokens=4, tools=TOOLS, tool_choice="none", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    resp = client.responses.create(model="smollm2", input="hi", max_output_tokens=4, tool_choice="none",
                                   tools=[{"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}])
    assert resp.output_text and all(o.type == "message" for o in resp.output)
    # asking for a call (auto, required, a named function) is still the 400 naming tools
    for choice in ("auto", "required", {"type": "function", "function": {"name": "weather"}}, None):
        kw = {} if choice is None else {"tool_choice": choice}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smollm2", messages=HI, max_tokens=4, tools=TOOLS, **kw)
        assert e.value.body["param"] == "tools" and "cannot call tools" in e.value.body["message"], e.value.body
