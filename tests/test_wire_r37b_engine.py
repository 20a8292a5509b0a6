"""The embedded engine through the wire (`archon serve`, default config, the official openai SDK): a prompt past the
context is a 400 with OpenAI's words, param and code whether streamed or not (chat and /v1/responses), before any
stream bytes; and the server log has no transformers warning of "indexing errors" for the prompts it refuses."""

from __future__ import annotations

import httpx
import openai
import pytest
from test_wire_r37_engine import ROOT, SAY_HI, SERVE_LOG, served  # noqa: F401 - a fixture

pytestmark = pytest.mark.e2e

LONG = [{"role": "user", "content": "The quick brown fox. " * 2500}]  # ~12.5K tokens: past SmolLM2's 8,192


def assert_context_error(body: dict, tokens: str = "your messages resulted in") -> None:
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages" and body["type"] == "invalid_request_error", body
    assert body["message"].startswith(f"This model's maximum context length is 8192 tokens. However, {tokens} "), body


def test_a_prompt_past_the_context_is_the_same_400_streamed_or_not(served):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as plain:
        served.chat.completions.create(model="smollm2", messages=LONG, max_tokens=10)
    with pytest.raises(openai.BadRequestError) as streamed:
        served.chat.completions.create(model="smollm2", messages=LONG, max_tokens=10, stream=True)
    assert plain.value.body == streamed.value.body
    assert_context_error(streamed.value.body)
    assert streamed.value.body["message"].endswith(" tokens. Please reduce the length of the messages.")
    # prompt + an explicit max_tokens past the context: OpenAI's other message, streamed too
    with pytest.raises(openai.BadRequestError) as e:
        served.chat.completions.create(model="smollm2", messages=SAY_HI, max_tokens=9000, stream=True)
    assert_context_error(e.value.body, "you requested")
    with pytest.raises(openai.BadRequestError) as e:
        served.responses.create(model="smollm2", input=LONG[0]["content"], stream=True, max_output_tokens=10)
    body = e.value.body  # the Responses API's own field and word (d483a8a)
    assert body["param"] == "input" and body["code"] == "context_length_exceeded" and "However, your input resulted in " in body["message"], body
    with pytest.raises(openai.BadRequestError) as e:  # an architecture whose first calls are refused so: the same
        served.chat.completions.create(model="self-moa", messages=LONG, stream=True)
    assert e.value.body["code"] == "context_length_exceeded"
    base = str(served.base_url).rstrip("/").removesuffix("/v1")
    r = httpx.post(base + "/v1/chat/completions", json={"model": "smollm2", "messages": LONG, "stream": True}, timeout=120)
    assert r.status_code == 400 and "text/event-stream" not in r.headers["content-type"]
    # a stream that fits starts with its role chunk, as before
    chunks = list(served.chat.completions.create(model="smollm2", messages=SAY_HI, max_tokens=5, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason


def test_no_tokenizer_warning_for_a_refused_prompt(served):  # noqa: F811
    log = SERVE_LOG["path"]
    with pytest.raises(openai.BadRequestError):
        served.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Jumps over the dog. " * 2600}], max_tokens=4)
    assert "This model's maximum context length" in log.read_text(errors="replace")  # the refusal is logged...
    assert "Token indices sequence length is longer" not in log.read_text(errors="replace")  # ...the misleading warning not
