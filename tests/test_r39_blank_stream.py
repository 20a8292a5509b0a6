"""A streamed synthesis that is only whitespace no longer reaches the client ahead of the fallback answer.

A final writer's every answer blank (``"\\n\\n"``: a small model's empty synthesis) falls back on its input's candidates
(graph/runtime.fall_back_on_empty), and the fallback goes out whole. Streamed, the blank pieces had already gone out,
so the client read ``"\\n\\n"`` + the sample. A writer's leading blank pieces are now held until a piece with text (or
a tool call) comes, and then sent in order; a choice that stays blank is sent after the layer when no fallback takes
its place (the stream still announces and finishes every choice), and dropped when one does.

Real path: a real uvicorn (in-process server), a scripted HTTP upstream, the official openai SDK.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from conftest import fake_config

from archon_server.components import prompts

ANSWER = "the first sample with an answer"


def is_fusion(body: dict[str, Any]) -> bool:
    return any(prompts.FUSER_SYSTEM[:80] in str(m.get("content")) for m in body.get("messages", []))


def streamed(server: Any, **kw: Any) -> tuple[dict[int, str], dict[int, str], dict[str, Any]]:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    trace: dict[str, Any] = {}
    for ch in c.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": "Say hi."}], stream=True,
                                        extra_body={"return_trace": True}, **kw):
        trace = (ch.model_extra or {}).get("trace") or trace
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return texts, finish, trace


def fallback_noted(trace: dict[str, Any]) -> bool:
    return any(n.startswith("fallback:") for n in trace["layers"][-1]["notes"])


@pytest.mark.parametrize("blank", ["\n\n", "   \n \t ", " "])
def test_a_blank_streamed_synthesis_is_not_sent_before_the_fallback(upstream_factory, server_factory, blank):
    def script(body: dict[str, Any]) -> dict[str, Any]:
        if is_fusion(body):
            return {"text": blank}
        return {"text": ["", ANSWER] + [f"sample {i}" for i in range(2, body.get("n", 1))]}

    texts, finish, trace = streamed(server_factory(fake_config(upstream_factory(script).url)))
    assert texts == {0: ANSWER} and finish == {0: "stop"}  # was blank + ANSWER
    assert fallback_noted(trace)


def test_a_blank_synthesis_with_nothing_to_fall_back_on_is_still_sent_and_finished(upstream_factory, server_factory):
    texts, finish, trace = streamed(server_factory(fake_config(upstream_factory(lambda body: {"text": " \n"}).url)))
    assert texts == {0: " \n"} and finish == {0: "stop"}  # the writer's own answer, as the plain request gives it
    assert not fallback_noted(trace)


def test_a_blank_choice_beside_an_answered_one_is_sent_in_full(upstream_factory, server_factory):
    def script(body: dict[str, Any]) -> dict[str, Any]:
        if is_fusion(body):
            return {"text": ["\n\n", "a fused answer"]}
        return {"text": [f"sample {i}" for i in range(body.get("n", 1))]}

    texts, finish, trace = streamed(server_factory(fake_config(upstream_factory(script).url)), n=2)
    assert texts == {0: "\n\n", 1: "a fused answer"} and finish == {0: "stop", 1: "stop"}
    assert not fallback_noted(trace)  # one answer was written: no fallback
