"""The rest of the OpenAI API clients use — Responses, Completions, structured outputs, tools, embeddings 404 —
through the official SDK against the real server (uvicorn) over scripted upstream HTTP servers."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from conftest import fake_config


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": False}


# -- /v1/responses ------------------------------------------------------------------------

def test_responses_create_runs_the_architecture_with_usage_and_trace(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    r = client(srv).responses.create(model="self-moa", input="Hi?", instructions="Be brief.", max_output_tokens=33,
                                     temperature=0.2, extra_body={"return_trace": True})
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.output_text == "fused answer from 6 responses"
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    # Same run as chat: one n=6 request, then the fuser; usage summed over both; client params on the final stage.
    assert [q.body.get("n") for q in up.requests] == [6, 1]
    fuse = up.requests[1].body
    assert fuse["max_tokens"] == 33 and fuse["temperature"] == 0.2 and up.requests[0].body["temperature"] == 0.7
    assert fuse["messages"][0]["role"] == "system" and fuse["messages"][0]["content"].startswith("Be brief.")
    assert r.usage.input_tokens == 20 and r.usage.output_tokens == 35 and r.usage.total_tokens == 55
    assert r.model_extra["trace"]["calls"] == 2
    lp = client(srv).responses.create(model="default", input="Hi?", top_logprobs=1,
                                      include=["message.output_text.logprobs"]).output[0].content[0].logprobs
    assert [t.token for t in lp] == ["answer", "0", "from", "fake-model"] and lp[0].logprob == -0.5 and lp[0].top_logprobs[0].token == "answer"


def test_responses_input_message_list_and_previous_response_id(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    first = c.responses.create(model="default", input=[
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]},
    ])
    assert first.output_text == "answer 0 from fake-model"
    assert up.requests[0].body["messages"] == [{"role": "developer", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    # A follow-up continues the kept conversation (the previous answer included).
    c.responses.create(model="default", input="Another?", previous_response_id=first.id)
    msgs = up.requests[1].body["messages"]
    assert [m["role"] for m in msgs] == ["developer", "user", "assistant", "user"] and msgs[2]["content"] == "answer 0 from fake-model"
    assert c.responses.retrieve(first.id).output_text == first.output_text
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve("resp_unknown")
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="default", input="x", previous_response_id="resp_unknown")
    assert e.value.body["param"] == "previous_response_id" and "not kept" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="default", input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}])
    assert "input[0].content[0].type" in e.value.body["message"]


def test_responses_stream_event_sequence(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"text": "one two three four", "token_delay": 0.01} if b.get("stream") else None)
    srv = server_factory(fake_config(up.url))
    with client(srv).responses.stream(model="self-moa", input="Hi", extra_body={"return_trace": True}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "one two three four" and len(deltas) == 4  # token by token from the final stage
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "one two three four" and final.status == "completed"
    assert final.usage.total_tokens > 0 and final.model_extra["trace"]["calls"] == 2
    assert up.requests[-1].body["stream"] is True and up.requests[0].body.get("stream") is False


def test_responses_stream_of_a_non_streamable_final_stage_and_failure(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    with client(srv).responses.stream(model="best-of-n", input="q") as stream:
        final = stream.get_final_response()
    assert final.output_text.startswith("answer ")  # the ranker's pick, whole

    bad = upstream_factory(lambda b: {"fault": "500"})
    srv2 = server_factory(fake_config(bad.url))
    events = list(client(srv2).responses.create(model="default", input="q", stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.error.code == "upstream_error"


def test_responses_truncated_answer_is_incomplete(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"text": "one two", "finish_reason": "length"})
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    r = c.responses.create(model="default", input="q", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens" and up.requests[0].body["max_tokens"] == 2
    assert r.output[0].status == "incomplete" and r.output_text == "one two"
    with c.responses.stream(model="default", input="q", max_output_tokens=2) as stream:
        last = list(stream)[-1]  # OpenAI's response.incomplete (vLLM sends a response.completed carrying the status)
    assert last.type == "response.incomplete" and last.response.status == "incomplete" and last.response.output_text == "one two"


# -- tools ------------------------------------------------------------------------------

def test_tools_reach_the_final_stage_and_tool_calls_come_back(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"tool_calls": [CALL]} if b.get("tools") else None)
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    r = c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER], tool_choice="auto")
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.id == "call_1" and call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    gen, fuse = up.requests[0].body, up.requests[1].body
    assert "tools" not in gen and fuse["tools"] == [WEATHER] and fuse["tool_choice"] == "auto"  # the final stage only

    # streamed: tool_calls deltas, the arguments in pieces
    stream = c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], stream=True)
    pieces, name, finish = [], None, None
    for ch in stream:
        for choice in ch.choices:
            for d in choice.delta.tool_calls or []:
                name = d.function.name or name
                pieces.append(d.function.arguments or "")
            finish = choice.finish_reason or finish
    assert name == "get_weather" and json.loads("".join(pieces)) == {"city": "Paris"} and finish == "tool_calls"

    # the round trip: the tool's result goes back with the assistant's tool_calls turn
    c.chat.completions.create(model="default", tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    msgs = up.requests[-1].body["messages"]
    assert msgs[1]["tool_calls"] == [CALL] and msgs[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_inner_layers_see_the_tools_only_if_the_architecture_says_so(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"tool_calls": [CALL]} if b.get("tools") else None)
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    c.chat.completions.create(model="moa-lite", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
                              extra_body={"architecture": {"tools_in_prompt": True}})
    proposers = [q.body for q in up.requests if "tools" not in q.body]
    assert proposers and all("get_weather: Weather of a city" in q["messages"][0]["content"] for q in proposers)
    assert all(q["messages"][-1] == {"role": "user", "content": "Weather?"} for q in proposers)
    up.requests.clear()
    c.chat.completions.create(model="moa-lite", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER])
    assert not any("get_weather" in json.dumps(q.body["messages"]) for q in up.requests)  # the default: final stage only


def test_responses_function_calls_non_streaming_and_streaming(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"tool_calls": [CALL]} if b.get("tools") else None)
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    tool = {"type": "function", "name": "get_weather", "description": "Weather of a city", "parameters": WEATHER["function"]["parameters"]}
    r = c.responses.create(model="default", input="Weather in Paris?", tools=[tool], tool_choice={"type": "function", "name": "get_weather"})
    assert up.requests[0].body["tools"] == [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}]
    assert up.requests[0].body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}  # in chat's shape
    item = r.output[0]
    assert item.type == "function_call" and item.name == "get_weather" and item.call_id == "call_1" and json.loads(item.arguments) == {"city": "Paris"}
    with c.responses.stream(model="default", input="Weather?", tools=[tool]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert final.output[0].type == "function_call" and json.loads(final.output[0].arguments) == {"city": "Paris"}
    # and the result back, as Responses input items
    c.responses.create(model="default", tools=[tool], input=[
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": CALL["function"]["arguments"]},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}])
    msgs = up.requests[-1].body["messages"]
    assert msgs[1]["tool_calls"][0]["id"] == "call_1" and msgs[2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}


def test_tools_refused_for_a_backend_that_cannot_call_them_and_for_a_selecting_final_stage(upstream_factory, server_factory):
    from archon_server.api.app import build_app
    from archon_server.backends.registry import build_registry
    from archon_server.testing.server import ServerThread

    up = upstream_factory()
    config = fake_config(up.url)
    registry = build_registry(config)
    registry.get("default").supports_tools = False
    with ServerThread(build_app(config, registry=registry)) as srv, pytest.raises(openai.BadRequestError) as e:
        client(srv).chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "x"}], tools=[WEATHER])
    assert e.value.body["param"] == "tools" and "model 'default'" in e.value.body["message"] and "cannot call tools" in e.value.body["message"]
    srv2 = server_factory(config)
    with pytest.raises(openai.BadRequestError) as e:
        client(srv2).chat.completions.create(model="best-of-n", messages=[{"role": "user", "content": "x"}], tools=[WEATHER])
    assert "ranker" in e.value.body["message"]
    assert not up.requests  # refused before any backend call


# -- structured outputs -------------------------------------------------------------------

def test_json_schema_goes_to_the_final_stage_and_the_answer_is_validated(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"text": '{"name": "Ada", "age": 36}'} if b.get("response_format") else None)
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "A person?"}], response_format=fmt)
    assert json.loads(r.choices[0].message.content) == {"name": "Ada", "age": 36}
    gen, fuse = up.requests[0].body, up.requests[1].body
    assert "response_format" not in gen and fuse["response_format"] == fmt  # guided decoding on the final stage
    assert '"age"' in fuse["messages"][0]["content"] and "JSON Schema" in fuse["messages"][0]["content"]  # the fuser is told

    # the Responses API's text.format, and the SDK's parse helper on top of it
    r2 = c.responses.create(model="self-moa", input="A person?", text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}})
    assert json.loads(r2.output_text)["name"] == "Ada"
    assert up.requests[-1].body["response_format"]["json_schema"]["schema"] == PERSON

    # the SDK's parse helpers (a pydantic model as the schema) work unchanged
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    assert c.responses.parse(model="self-moa", input="A person?", text_format=Person).output_parsed == Person(name="Ada", age=36)
    parsed = c.chat.completions.parse(model="self-moa", messages=[{"role": "user", "content": "A person?"}], response_format=Person)
    assert parsed.choices[0].message.parsed == Person(name="Ada", age=36)


def test_invalid_structured_answer_is_retried_then_refused(upstream_factory, server_factory):
    answers = iter(['{"name": "Ada"}', '```json\n{"name": "Ada", "age": 36}\n```'])
    up = upstream_factory(lambda b: {"text": next(answers)} if b.get("response_format") else None)
    srv = server_factory(fake_config(up.url))
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = client(srv).chat.completions.create(model="default", messages=[{"role": "user", "content": "A person?"}], response_format=fmt)
    assert r.choices[0].message.content == '{"name": "Ada", "age": 36}'  # second try, code fence dropped
    assert len(up.requests) == 2

    up2 = upstream_factory(lambda b: {"text": "not json at all"})
    srv2 = server_factory(fake_config(up2.url))
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client(srv2).chat.completions.create(model="default", messages=[{"role": "user", "content": "?"}], response_format={"type": "json_object"})
    assert e.value.body["code"] == "invalid_structured_output" and "not valid JSON" in e.value.body["message"]
    assert len(up2.requests) == 2
    with pytest.raises(openai.BadRequestError) as e:
        client(srv2).chat.completions.create(model="default", messages=[{"role": "user", "content": "?"}],
                                             response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert "response_format" in e.value.body["message"]


def test_a_streamed_answer_that_is_not_the_json_asked_for_ends_in_an_error(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"text": "plain words"})
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30, json={
            "model": "default", "stream": True, "messages": [{"role": "user", "content": "?"}], "response_format": {"type": "json_object"}}) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "invalid_structured_output"
    events = list(c.responses.create(model="default", input="?", stream=True, text={"format": {"type": "json_object"}}))
    assert events[-1].type == "response.failed" and events[-1].response.error.code == "invalid_structured_output"
    assert len(up.requests) == 2  # streamed answers are checked, not asked for again


def test_a_structured_answer_cut_at_max_tokens_is_returned_as_it_is(upstream_factory, server_factory):
    """JSON cut by the client's own max_tokens is not the model's fault: returned with finish_reason length, as OpenAI
    and vLLM do, not run again and refused with a 422."""
    up = upstream_factory(lambda b: {"text": '{"name": "Ad', "finish_reason": "length"} if b.get("response_format") else None)
    srv = server_factory(fake_config(up.url))
    for model, calls in (("default", 1), ("self-moa", 2)):
        r = client(srv).chat.completions.create(model=model, messages=[{"role": "user", "content": "A person?"}], max_tokens=4,
                                                response_format={"type": "json_object"}, extra_body={"return_trace": True})
        assert r.choices[0].message.content == '{"name": "Ad' and r.choices[0].finish_reason == "length"
        assert r.model_extra["trace"]["calls"] == calls  # not run again
    assert len(up.requests) == 3


# -- sampling extras: OpenAI's penalties and vLLM's extra sampling params -------------------

EXTRAS = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "presence_penalty": 0.3, "frequency_penalty": -0.1,
          "min_tokens": 4, "ignore_eos": True}


def test_sampling_extras_reach_the_final_stage_only(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "x"}], extra_body=EXTRAS)
    gen, fuse = up.requests[0].body, up.requests[1].body
    assert not set(EXTRAS) & set(gen)  # inner layers keep their own sampling
    assert {k: fuse.get(k) for k in EXTRAS} == EXTRAS
    # the same on /v1/completions, straight to a backend and through an architecture
    c.completions.create(model="default", prompt="x", extra_body=EXTRAS)
    assert {k: up.requests[2].body.get(k) for k in EXTRAS} == EXTRAS
    c.completions.create(model="self-moa", prompt="x", presence_penalty=0.3, extra_body={"top_k": 5})
    assert not {"top_k", "presence_penalty"} & set(up.requests[3].body)
    assert up.requests[4].body["top_k"] == 5 and up.requests[4].body["presence_penalty"] == 0.3
    # vLLM's neutral values change nothing and are not sent: top_k 0 or -1 (off), ignore_eos false
    c.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], extra_body={"top_k": -1, "ignore_eos": False, "min_p": 0})
    assert not {"top_k", "ignore_eos", "min_p"} & set(up.requests[5].body)
    for bad, param in (({"top_k": -2}, "top_k"), ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
                       ({"min_p": 1.5}, "min_p"), ({"ignore_eos": "maybe"}, "ignore_eos")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "x"}], extra_body=bad)
        assert param in e.value.body["message"]
    assert len(up.requests) == 6


def test_a_sampling_extra_the_final_backend_cannot_honour_is_refused_before_any_call(upstream_factory, server_factory):
    from archon_server.api.app import build_app
    from archon_server.backends.registry import build_registry
    from archon_server.testing.server import ServerThread

    up = upstream_factory()
    config = fake_config(up.url)
    registry = build_registry(config)
    registry.get("default").sampling_extras = frozenset({"top_k", "ignore_eos"})
    with ServerThread(build_app(config, registry=registry)) as srv:
        c = client(srv)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "x"}], extra_body={"top_k": 3, "min_p": 0.1})
        body = e.value.body
        assert body["param"] == "min_p" and "model 'default'" in body["message"] and "top_k, ignore_eos" in body["message"]
        with pytest.raises(openai.BadRequestError) as e:  # a stream is refused before it starts: a 400, not an error event
            c.completions.create(model="default", prompt="x", stream=True, extra_body={"min_tokens": 2})
        assert e.value.body["param"] == "min_tokens"
        assert not up.requests
        # what it honours goes through
        c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "x"}], extra_body={"top_k": 3})
        assert up.requests[1].body["top_k"] == 3
        # best-of-n's final stage is a ranker: what shapes the answer goes to the writers it picks from ('default'),
        # so it is checked against them; how to sample (min_p) stays theirs, so there is nothing to refuse
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="best-of-n", messages=[{"role": "user", "content": "x"}], extra_body={"min_tokens": 2})
        assert e.value.body["param"] == "min_tokens" and "the final stage of 'best-of-n'" in e.value.body["message"]
        c.chat.completions.create(model="best-of-n", messages=[{"role": "user", "content": "x"}], extra_body={"min_p": 0.1})
        assert not any("min_p" in q.body or "min_tokens" in q.body for q in up.requests)


# -- /v1/models/{id} --------------------------------------------------------------------------

def test_models_retrieve(upstream_factory, server_factory):
    up = upstream_factory()
    c = client(server_factory(fake_config(up.url)))
    m = c.models.retrieve("self-moa")
    listed = {x.id: x for x in c.models.list().data}
    assert m.id == "self-moa" and m.object == "model" and m.model_extra["kind"] == "architecture"
    assert m.model_extra["description"] == listed["self-moa"].model_extra["description"]
    assert c.models.retrieve("fake").model_extra["kind"] == "backend"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("org/none")
    assert e.value.body["code"] == "model_not_found" and "org/none" in e.value.body["message"]


# -- /v1/completions ------------------------------------------------------------------------

def test_completions_on_a_backend_are_raw_pass_through(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    r = c.completions.create(model="default", prompt=["The sky is", "Grass is"], n=2, max_tokens=7, stop=["\n"], logprobs=2, echo=True,
                             extra_body={"return_trace": True})
    assert r.object == "text_completion" and [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith("The sky is") and r.choices[2].text.startswith("Grass is")  # echo, prompt order
    assert r.choices[0].logprobs.tokens and r.choices[0].logprobs.token_logprobs[0] == -0.5
    bodies = sorted((q.body for q in up.requests), key=lambda b: b["prompt"])
    assert [b["prompt"] for b in bodies] == ["Grass is", "The sky is"] and "messages" not in bodies[0]
    assert bodies[0]["n"] == 2 and bodies[0]["max_tokens"] == 7 and bodies[0]["stop"] == ["\n"] and bodies[0]["logprobs"] == 2 and bodies[0]["echo"] is True
    assert r.usage.prompt_tokens == 20 and r.model_extra["trace"]["calls"] == 2

    chunks = list(c.completions.create(model="default", prompt="The sky is", stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == "completion 0 of The sky is" and chunks[-1].usage.total_tokens > 0
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_completions_on_an_architecture_run_the_prompt_as_one_user_message(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    r = c.completions.create(model="self-moa", prompt="Tell me a joke", max_tokens=20, echo=True)
    assert r.choices[0].text == "Tell me a joke" + "fused answer from 6 responses"
    assert up.requests[0].body["messages"] == [{"role": "user", "content": "Tell me a joke"}] and up.requests[1].body["max_tokens"] == 20
    lp = c.completions.create(model="self-moa", prompt="Tell me a joke", logprobs=1, echo=True).choices[0].logprobs  # the final stage's
    assert lp.tokens == ["fused", "answer", "from", "6", "responses"] and lp.token_logprobs == [-0.5] * 5
    assert lp.top_logprobs[0] == {"fused": -0.5} and lp.text_offset[0] == len("Tell me a joke")
    chunks = list(c.completions.create(model="self-moa", prompt=["a", "b"], stream=True))
    by_index: dict[int, str] = {}
    for ch in chunks:
        for choice in ch.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + choice.text
    assert by_index == {0: "fused answer from 6 responses", 1: "fused answer from 6 responses"}


def test_completions_bad_input(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    c = client(srv)
    for kw, param in [({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "best_of": 3}, "best_of")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="default", **kw)
        assert e.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    bad = upstream_factory(lambda b: {"fault": "503"})
    with pytest.raises(openai.APIStatusError) as e:
        client(server_factory(fake_config(bad.url))).completions.create(model="default", prompt="x")
    assert e.value.status_code == 502 and "503" in e.value.body["message"] and len(bad.requests) == 2  # retried once, then 502


# -- /v1/embeddings ------------------------------------------------------------------------

def test_embeddings_404_names_what_is_served(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    with pytest.raises(openai.NotFoundError) as e:
        client(srv).embeddings.create(model="self-moa", input="hello")
    body = e.value.body
    assert body["code"] == "embeddings_not_served" and "self-moa" in body["message"] and "/v1/responses" in body["message"]
    assert httpx.post(srv.url + "/v1/embeddings", json={}).json()["error"]["type"] == "not_found_error"


def test_responses_and_completions_are_kept_in_the_trace_store(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url, keep_traces=8))
    c = client(srv)
    r = c.responses.create(model="self-moa", input="Hi?")
    with c.responses.stream(model="default", input="Streamed?") as s:
        s.get_final_response()
    k = c.completions.create(model="default", prompt="Once upon")
    kept = {t["id"]: t for t in httpx.get(srv.url + "/v1/traces").json()["data"]}
    assert r.id in kept and k.id in kept and len(kept) == 3
    item = httpx.get(srv.url + f"/v1/traces/{r.id}").json()
    assert item["answers"] == [r.output_text] and item["trace"]["calls"] == 2


async def test_one_server_many_shapes_at_once(upstream_factory, server_factory):
    """Chat, Responses and Completions, streamed and not, all in flight together and again: every answer right, and
    the server's in-flight count back to zero after."""
    import asyncio

    up = upstream_factory(latency=0.02)
    srv = server_factory(fake_config(up.url))
    ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)

    async def streamed_response(i: int) -> str:
        async with ac.responses.stream(model="moa-lite", input=f"q{i}") as s:
            return (await s.get_final_response()).output_text

    async def streamed_completion(i: int) -> str:
        return "".join([ch.choices[0].text async for ch in await ac.completions.create(model="default", prompt=f"p{i}", stream=True) if ch.choices])

    for _ in range(2):
        jobs = []
        for i in range(4):
            jobs += [ac.responses.create(model="self-moa", input=f"q{i}"), streamed_response(i),
                     ac.completions.create(model="default", prompt=[f"p{i}", f"r{i}"]), streamed_completion(i),
                     ac.chat.completions.create(model="moa-lite", messages=[{"role": "user", "content": "x" * 20000}])]
        out = await asyncio.gather(*jobs)
        for i in range(4):
            resp, sresp, comp, scomp, chat = out[5 * i: 5 * i + 5]
            assert resp.output_text == sresp == chat.choices[0].message.content == "fused answer from 6 responses"
            assert [c.text for c in comp.choices] == [f"completion 0 of p{i}", f"completion 0 of r{i}"] and scomp == f"completion 0 of p{i}"
    async with httpx.AsyncClient() as h:
        assert "archon_requests_in_flight 0.0" in (await h.get(srv.url + "/metrics")).text
    await ac.close()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path,body", [("/v1/responses", {"model": "moa-lite", "input": "Q"}),
                                       ("/v1/completions", {"model": "moa-lite", "prompt": "Q"}),
                                       ("/v1/completions", {"model": "default", "prompt": "Q"})])
def test_client_disconnect_cancels_upstream_calls(upstream_factory, server_factory, path, body, stream):
    up = upstream_factory(lambda b: {"fault": "hang"})
    srv = server_factory(fake_config(up.url))
    # The client gives up after 2 s: the upstream calls must be out by then, also on a loaded machine (1 s was tight).
    with pytest.raises(httpx.TimeoutException), httpx.Client(timeout=2.0) as h:
        h.post(srv.url + path, json={**body, "stream": stream})
    want = 1 if body["model"] == "default" else 6
    deadline = time.time() + 30  # (a loaded machine may take seconds to get there; done at once when it is)
    while time.time() < deadline and not (len(up.requests) == want and all(q.aborted for q in up.requests)):
        time.sleep(0.05)
    assert len(up.requests) == want and all(q.aborted for q in up.requests)
