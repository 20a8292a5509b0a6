"""The chat.completion body is built as dicts (api/chat/serving.py, ChatService._answer) for speed; the pydantic
model ChatCompletionResponse stays its schema. These shapes must come out exactly as the model would dump them."""

from __future__ import annotations

from typing import Any

import pytest

from archon_server.api.chat.protocol import ChatCompletionRequest, ChatCompletionResponse, Choice, ResponseMessage, UsageInfo
from archon_server.api.chat.serving import ChatService, _logprobs_json, finish_reason
from archon_server.backends.base import TokenLogprob, Usage
from archon_server.components.state import Candidate
from archon_server.components.trace import Trace
from archon_server.graph.runtime import RunResult

CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
LPS = [TokenLogprob("Hi", -0.1, [("Hi", -0.1), ("Hey", -2.5)]), TokenLogprob("!", -0.3, [])]


def _model_dump(req: ChatCompletionRequest, res: RunResult, cid: str, created: int) -> dict[str, Any]:
    """What the answer was before it was built by hand: the protocol models, dumped without None fields - but for
    a message's ``content``, which OpenAI sends as null beside tool calls (and the model requires)."""
    choices = [
        Choice(index=i, message=ResponseMessage(content=c.text or (None if c.meta.get("tool_calls") else ""), tool_calls=c.meta.get("tool_calls")),
               finish_reason=finish_reason(c), logprobs=_logprobs_json(c.meta.get("logprobs")) if req.logprobs else None)
        for i, c in enumerate(res.candidates)
    ]
    u = res.usage
    out = ChatCompletionResponse(
        id=cid, created=created, model=req.model, choices=choices,
        usage=UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens),
        trace=res.trace.to_dict() if req.return_trace else None,
    ).model_dump(exclude_none=True)
    for ch in out["choices"]:
        ch["message"] = {"role": "assistant", "content": ch["message"].get("content"), **ch["message"]}
    return out


def _trace() -> Trace:
    tr = Trace("self-moa")
    lt = tr.add_layer(0, ["g"], 0)
    lt.finish_call("g", "generator", "fake", 2, lt.call_started("g", "generator", "fake", 2, "2 sample(s)"), usage=Usage(3, 4))
    lt.finish_call("g", "generator", "fake", 1, lt.call_started("g", "generator", "fake", 1, ""), error="boom", status="error")
    tr.end_layer(lt)
    return tr


CANDIDATES = {
    "plain": [Candidate("Hello.")],
    "empty text": [Candidate("")],
    "length": [Candidate("Hel", finish_reason="length"), Candidate("Hello there", finish_reason="")],
    "tool calls, no text": [Candidate("", meta={"tool_calls": [CALL]})],
    "tool calls and text": [Candidate("Calling f.", meta={"tool_calls": [CALL]})],
    "empty tool call list": [Candidate("", meta={"tool_calls": []})],
    "logprobs": [Candidate("Hi!", meta={"logprobs": LPS}), Candidate("Yo", meta={})],
    "unicode": [Candidate("naïve — 漢字 \U0001f600")],
}


@pytest.mark.parametrize("shape", sorted(CANDIDATES))
@pytest.mark.parametrize("logprobs", [False, True])
@pytest.mark.parametrize("return_trace", [False, True])
def test_answer_is_what_the_protocol_model_dumps(shape: str, logprobs: bool, return_trace: bool) -> None:
    req = ChatCompletionRequest.model_validate({"model": "self-moa", "messages": [{"role": "user", "content": "hi"}],
                                                "logprobs": logprobs, "return_trace": return_trace})
    res = RunResult(CANDIDATES[shape], Usage(7, 9), _trace())
    got = ChatService._answer(req, res, "chatcmpl-1")
    assert got == _model_dump(req, res, "chatcmpl-1", got["created"])
    assert list(got) == list(_model_dump(req, res, "chatcmpl-1", got["created"]))  # same key order on the wire
    for mine, theirs in zip(got["choices"], _model_dump(req, res, "chatcmpl-1", got["created"])["choices"]):
        assert list(mine) == list(theirs) and list(mine["message"]) == list(theirs["message"])
    # and the schema (OpenAPI) still describes the body
    assert ChatCompletionResponse.model_validate(got).model_dump(exclude_none=True) == {
        **got, "choices": [{**c, "message": {k: v for k, v in c["message"].items() if v is not None}} for c in got["choices"]]}
