"""The Responses API's two remaining documented parts a client of OpenAI's uses, walked with the official openai SDK:

- ``truncation: "auto"`` was ignored (accepted as an unknown field): a conversation past the model's context was
  refused with a 400 as with ``"disabled"``. Now its oldest turns are dropped until it fits, with room for the answer
  (components/fit.drop_oldest), instructions kept and never a tool result without its call; the Response echoes it;
- ``client.responses.input_items.list(id)`` was a 404: it lists the items the response was made from (earlier turns
  through ``previous_response_id`` included), as OpenAI's cursor page (newest first by default, ``limit``, ``after``).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from archon_server.api.app import build_app
from archon_server.backends.base import ChatRequest
from archon_server.backends.registry import BackendRegistry, build_registry
from archon_server.components.fit import drop_oldest
from archon_server.config import ServerConfig
from archon_server.testing.server import ServerThread, serve_process
from conftest import fake_config
from test_fit import counting

ROOT = Path(__file__).resolve().parent.parent
FILLER = "the quick brown fox jumps over the lazy dog " * 20  # 900 bytes: 230 tokens by counting()'s rule


def conversation(turns: int) -> list[dict]:
    out: list[dict] = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        out += [{"role": "user", "content": f"Q{i} {FILLER}"}, {"role": "assistant", "content": f"A{i} {FILLER}"}]
    return out + [{"role": "user", "content": "Last question?"}]


def tokens(messages: list[dict]) -> int:  # counting()'s rule
    return sum(len(str(m["content"]).encode()) // 4 + 5 for m in messages)


# -- drop_oldest: the rule, over a backend that counts deterministically ------------------------------------------------
async def test_the_fewest_oldest_turns_go_and_the_instructions_stay(upstream_factory):
    reg = build_registry(fake_config(upstream_factory().url))
    calls = counting(reg.get("default"), window=4000)
    msgs = conversation(10)  # ~4,640 tokens by the count: over 4,000 - 500
    out, dropped = await drop_oldest(reg, ["default"], msgs, reply_tokens=500)
    assert out[0] == msgs[0] and out[-1] == msgs[-1] and out[1:] == msgs[1 + dropped:]
    assert tokens(out) <= 3500 < tokens([msgs[0], *msgs[dropped:]])  # fits, and one turn fewer dropped would not
    assert len(calls) <= 7  # bisection over 21 places to start, not a count per turn

    # without max_output_tokens, a quarter of the context is kept for the answer
    out, dropped = await drop_oldest(reg, ["default"], msgs, reply_tokens=None)
    assert tokens(out) <= 3000 < tokens([msgs[0], *msgs[dropped:]])
    # it fits: as it is; even the last turn alone does not fit: as it is (the backend refuses it, as with "disabled")
    assert await drop_oldest(reg, ["default"], conversation(2), reply_tokens=500) == (conversation(2), 0)
    assert await drop_oldest(reg, ["default"], msgs, reply_tokens=3990) == (msgs, 0)


async def test_a_tool_result_never_opens_what_is_kept_and_every_reader_must_fit(upstream_factory):
    reg = build_registry(fake_config(upstream_factory().url))
    counting(reg.get("default"), window=2000)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = [{"role": "user", "content": FILLER * 5}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": FILLER * 4}, {"role": "user", "content": "So?"}]
    # ~2,045 tokens; without the first message ~915: fits 2000 - 100, opening on the assistant's call
    out, dropped = await drop_oldest(reg, ["default"], msgs, reply_tokens=100)
    assert dropped == 1 and out[0]["role"] == "assistant"
    # with room only for the last turn, the tool result is not a place to start: its call goes with it
    out, dropped = await drop_oldest(reg, ["default"], msgs, reply_tokens=1500)
    assert out == msgs[-1:] and dropped == 3
    # of two models that read the conversation, the smaller context decides
    url = upstream_factory().url
    reg2 = build_registry(ServerConfig.model_validate({"backends": [
        {"alias": a, "kind": "openai", "model": "fake-model", "urls": [url]} for a in ("big", "small")]}))
    counting(reg2.get("big"), window=8000)
    counting(reg2.get("small"), window=1200)
    out, _ = await drop_oldest(reg2, ["big", "small"], conversation(10), reply_tokens=200)
    assert tokens(out) <= 1000 < tokens(conversation(10))


@pytest.mark.e2e
async def test_the_engine_tokenizer_decides_what_fits(embedded_backend):
    reg = BackendRegistry()
    reg.register("smol", embedded_backend, "smollm2")
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(8):
        msgs += [{"role": "user", "content": f"Q{i} " + FILLER * 6}, {"role": "assistant", "content": f"A{i} " + FILLER * 6}]
    msgs.append({"role": "user", "content": "Last?"})  # ~16 x 1,100 tokens: past 8,192
    out, dropped = await drop_oldest(reg, ["smol"], msgs, reply_tokens=1024)
    n = await embedded_backend.prompt_tokens(ChatRequest("smollm2", out))
    assert dropped > 0 and out[0] == msgs[0] and out[-1] == msgs[-1]
    assert 8192 - 1024 - 1200 < n <= 8192 - 1024  # within a turn of the room


# -- over the wire: a real server in front of a fake upstream that counts -------------------------------------------------
@pytest.fixture
def counted_server(upstream_factory):
    up = upstream_factory()
    config = fake_config(up.url)
    reg = build_registry(config)
    counting(reg.get("default"), window=4000)
    with ServerThread(build_app(config, reg)) as s:
        yield up, openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_truncation_auto_sends_what_fits_and_the_response_says_so(counted_server):
    up, client = counted_server
    msgs = conversation(10)
    items = [{"type": "message", "role": m["role"], "content": m["content"]} for m in msgs[1:]]
    for stream in (False, True):
        r = client.responses.create(model="default", instructions="Be brief.", input=items, truncation="auto", max_output_tokens=500, stream=stream)
        r = list(r)[-1].response if stream else r
        assert r.status == "completed" and r.truncation == "auto"
        sent = up.requests[-1].body["messages"]
        assert sent[0] == {"role": "system", "content": "Be brief."} and sent[-1]["content"] == "Last question?"
        assert 5 < len(sent) < len(msgs) and tokens(sent) <= 3500
    # an architecture: the conversation takes at most half the room, the fuser's candidates the rest
    before = len(up.requests)
    r = client.responses.create(model="self-moa", instructions="Be brief.", input=items, truncation="auto", max_output_tokens=500)
    assert r.status == "completed" and len(up.requests) - before == 2
    sent = up.requests[before].body["messages"]
    assert sent[0]["content"] == "Be brief." and sent[-1]["content"] == "Last question?" and 1000 < tokens(sent) <= 1750
    r = client.responses.create(model="default", input=items, max_output_tokens=500)
    assert r.truncation == "disabled" and len(up.requests[-1].body["messages"]) == len(msgs) - 1  # sent whole
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="default", input="x", truncation="sometimes")
    assert e.value.body["param"] == "truncation", e.value.body


def test_input_items_list_the_conversation_newest_first_in_pages(counted_server):
    _, client = counted_server
    r1 = client.responses.create(model="default", input=[{"role": "developer", "content": "Terse."},
                                                          {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}])
    r2 = client.responses.create(model="default", input="And then?", previous_response_id=r1.id, instructions="not an item")
    items = client.responses.input_items.list(r2.id)
    got = [(it.type, getattr(it, "role", None)) for it in items.data]
    assert got == [("message", "user"), ("message", "assistant"), ("message", "user"), ("message", "developer")]
    assert items.data[1].id == r1.output[0].id and items.data[1].content[0].text == r1.output_text
    assert items.data[0].content[0].text == "And then?" and items.data[0].content[0].type == "input_text"
    assert items.first_id == items.data[0].id and items.last_id == items.data[-1].id and not items.has_more
    assert len({it.id for it in items.data}) == 4 and all(it.status == "completed" for it in items.data)
    # pages of one, followed by the SDK's cursor (after = the last id), in both orders
    assert [it.id for it in client.responses.input_items.list(r2.id, limit=1)] == [it.id for it in items.data]
    assert [it.id for it in client.responses.input_items.list(r2.id, limit=3, order="asc")] == [it.id for it in items.data][::-1]
    page = client.responses.input_items.list(r2.id, limit=3)
    assert page.has_more and len(page.data) == 3
    assert [it.id for it in client.responses.input_items.list(r2.id, after=page.last_id).data] == [items.data[-1].id]
    # r1's own items: its input only
    assert [it.role for it in client.responses.input_items.list(r1.id)] == ["user", "developer"]

    for bad in ({"limit": 0}, {"limit": 101}, {"order": "up"}, {"after": "msg_nope"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.input_items.list(r2.id, **bad)
        assert e.value.body["param"] == next(iter(bad)), e.value.body  # the parameter's name, not FastAPI's `query.limit`
    client.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(r1.id)
    unstored = client.responses.create(model="default", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(unstored.id)


def test_function_call_round_trip_items_keep_their_shapes(counted_server):
    _, client = counted_server
    r = client.responses.create(model="default", input=[
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ])
    items = client.responses.input_items.list(r.id, order="asc").data
    assert [it.type for it in items] == ["message", "function_call", "function_call_output"]
    assert items[1].call_id == "call_1" and items[1].name == "weather" and items[2].output == "sunny"
    assert items[1].id.startswith("fc_") and items[2].id.startswith("fco_")


# -- the default server: the embedded engine --------------------------------------------------------------------------
@pytest.mark.e2e
def test_the_default_server_truncates_a_conversation_past_the_engine_context():
    """SmolLM2's 8,192 tokens: with max_output_tokens 7,900 only the last turn fits (the earlier ones are ~700 tokens
    each). Disabled (the default), it is OpenAI's 400; auto, it is answered from what fits. The answer is held to a
    short JSON object by a schema, so that it ends long before its 7,900 tokens."""
    log = ROOT / ".pytest_cache" / "r40-responses-serve.log" if (ROOT / ".pytest_cache").is_dir() else None
    items = []
    for i in range(4):
        items += [{"role": "user", "content": f"Question {i}: " + FILLER * 3}, {"role": "assistant", "content": f"Answer {i}: " + FILLER * 3}]
    items.append({"role": "user", "content": "Is the sky blue? Answer yes or no."})
    fmt = {"format": {"type": "json_schema", "name": "answer", "strict": True, "schema": {
        "type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}}, "required": ["answer"], "additionalProperties": False}}}
    with serve_process(["serve"], log=log, cwd=str(ROOT)) as (_proc, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        ask = dict(model="smollm2", input=items, max_output_tokens=7900, temperature=0, text=fmt)
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**ask)
        assert e.value.body["code"] == "context_length_exceeded", e.value.body
        r = client.responses.create(truncation="auto", **ask)
        assert r.status == "completed" and r.truncation == "auto" and 0 < r.usage.input_tokens <= 8192 - 7900, r
        assert json.loads(r.output_text)["answer"] in ("yes", "no")
        listed = httpx.get(f"{url}/v1/responses/{r.id}/input_items", params={"limit": 100}).json()["data"]
        assert len(listed) == len(items) and listed[-1]["content"][0]["text"].startswith("Question 0")  # all it was given
