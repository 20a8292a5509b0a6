"""vLLM's chat-template switches through the wire: ``continue_final_message`` (with ``add_generation_prompt: false``)
continues the conversation's final assistant message — a prefilled answer — instead of answering it with a new turn.

Before, both were ignored as unknown fields: a client could not prefill an answer (the embedded engine opened a new
turn), and an OpenAI-compatible upstream never got them. They apply to the final stage's writers, as the other
answer-shaping parameters do (a fuser continues the prefix; the samples before it answer; the writers a selecting final
stage picks from continue it); vLLM's 400 when both are on, and ours when the last message is not the assistant's.

Real parts: a real uvicorn (``archon serve`` on the embedded default for the engine's half; the in-process server on a
scripted HTTP upstream for what each call carries), the official openai SDK.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from conftest import fake_config

from archon_server.testing.server import serve_process

ROOT = Path(__file__).resolve().parent.parent
PREFILLED = [{"role": "user", "content": "Name the days of the week, in order."},
             {"role": "assistant", "content": "Monday, Tuesday, Wednesday,"}]
CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}


def sdk(url: str, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)


# -- what each backend call carries (scripted upstream) -----------------------------------------------------------


def _calls(up) -> list[dict]:
    return [r.body for r in up.requests]


def test_an_aggregators_call_continues_the_prefix_and_the_samples_answer(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    r = sdk(srv.url).chat.completions.create(model="self-moa", messages=PREFILLED, max_tokens=32, extra_body=CONTINUE)
    assert r.choices[0].message.content
    bodies = _calls(up)
    samples = [b for b in bodies if b.get("n", 1) > 1]
    finals = [b for b in bodies if b.get("n", 1) == 1]
    assert samples and finals, bodies
    for b in samples:  # the samples answer the conversation (a new turn, the upstream's default)
        assert "continue_final_message" not in b and "add_generation_prompt" not in b, b
    for b in finals:  # the aggregation is the answer: it continues the client's prefix, which ends its messages
        assert b["continue_final_message"] is True and b["add_generation_prompt"] is False, b
        assert b["messages"][-1] == PREFILLED[-1], b["messages"]


def test_a_backend_alias_and_the_writers_of_a_selecting_stage_get_the_switches(upstream_factory, server_factory):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    client = sdk(srv.url)
    client.chat.completions.create(model="fake", messages=PREFILLED, max_tokens=8, extra_body=CONTINUE)
    (alias,) = _calls(up)
    assert alias["continue_final_message"] is True and alias["add_generation_prompt"] is False
    up.requests.clear()
    client.chat.completions.create(model="best-of-n", messages=PREFILLED, max_tokens=8, extra_body=CONTINUE)
    writers = [b for b in _calls(up) if b["messages"][-1] == PREFILLED[-1]]
    assert writers and all(b.get("continue_final_message") is True for b in writers), _calls(up)
    up.requests.clear()
    # add_generation_prompt false alone: passed on as it is (the conversation without a new turn's header)
    client.chat.completions.create(model="fake", messages=PREFILLED, max_tokens=8, extra_body={"add_generation_prompt": False})
    (alone,) = _calls(up)
    assert alone["add_generation_prompt"] is False and "continue_final_message" not in alone
    up.requests.clear()
    client.chat.completions.create(model="fake", messages=PREFILLED, max_tokens=8)  # the default sends neither
    (plain,) = _calls(up)
    assert "continue_final_message" not in plain and "add_generation_prompt" not in plain


@pytest.mark.parametrize("body,says", [
    ({"messages": PREFILLED, **CONTINUE, "add_generation_prompt": True},
     "Cannot set both `continue_final_message` and `add_generation_prompt` to True."),
    ({"messages": PREFILLED[:1], "continue_final_message": True}, "the last message must be the assistant's answer"),
])
def test_a_switch_that_cannot_apply_is_a_400_naming_continue_final_message(upstream_factory, server_factory, body, says):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))
    with pytest.raises(openai.BadRequestError) as e:
        sdk(srv.url).chat.completions.create(model="fake", max_tokens=8, messages=body.pop("messages"), extra_body=body)
    assert e.value.body["param"] == "continue_final_message" and says in e.value.body["message"], e.value.body
    assert not up.requests  # refused before any call


# -- the embedded engine continues the prefix ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log = tmp_path_factory.mktemp("r39-prefill") / "serve.log"
    with serve_process(["serve"], log=log, cwd=str(ROOT)) as (_proc, url):
        yield url


@pytest.mark.e2e
def test_the_embedded_engine_continues_a_prefilled_answer(served):
    client = sdk(served, timeout=300)
    greedy = {"model": "smollm2", "messages": PREFILLED, "max_tokens": 12, "temperature": 0}
    new_turn = client.chat.completions.create(**greedy)
    cont = client.chat.completions.create(**greedy, extra_body=CONTINUE)
    # the prefix stays open: the end of its turn and a new turn's header are not in the prompt
    assert cont.usage.prompt_tokens < new_turn.usage.prompt_tokens, (cont.usage, new_turn.usage)
    assert cont.choices[0].message.content and cont.choices[0].message.content != new_turn.choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       client.chat.completions.create(**greedy, extra_body=CONTINUE, stream=True) if ch.choices)
    assert streamed == cont.choices[0].message.content
    # and through an architecture: its final stage continues (a 200 with an answer; what each call carries is above)
    moa = client.chat.completions.create(model="self-moa", messages=PREFILLED, max_tokens=16, extra_body=CONTINUE)
    assert moa.choices[0].message.content
