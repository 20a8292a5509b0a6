"""The embedded engine through the wire (`archon serve`, default config, the official openai SDK): the EOS is a
generated token with its logprob entry, as vLLM has it (completion_tokens and the logprobs agree), byte-fallback
tokens (a CJK character split over byte tokens) are named by the text they add and carry their raw bytes, and an
explicit max_tokens that cannot fit the context on a direct request is a 400 with OpenAI's (older vLLM's) message."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from archon_server.testing.server import serve_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
SAY_HI = [{"role": "user", "content": "Say hi"}]
CJK = "東京東京東京東京東京東京"  # SmolLM2 writes 東 as two byte-level tokens (E6 9D | B1) and 京 as (E4 BA | AC)


SERVE_LOG: dict[str, Path] = {}  # the served fixture's server log, for tests that read it


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log = SERVE_LOG["path"] = tmp_path_factory.mktemp("wire-r37-engine") / "serve.log"
    with serve_process(["serve"], log=log, cwd=str(ROOT)) as (_proc, url):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_the_eos_is_counted_and_has_its_logprob_entry(served):
    r = served.chat.completions.create(model="smollm2", messages=SAY_HI, max_tokens=120, temperature=0, logprobs=True, top_logprobs=1)
    c = r.choices[0]
    assert c.finish_reason == "stop"  # ended by the EOS
    content = c.logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert content[-1].token == "<|im_end|>" and content[-1].logprob <= 0 and "<|im_end|>" not in c.message.content
    streamed = [t for ch in served.chat.completions.create(model="smollm2", messages=SAY_HI, max_tokens=120, temperature=0, logprobs=True,
                                                           stream=True, stream_options={"include_usage": True})
                for t in (ch.choices[0].logprobs.content or [] if ch.choices and ch.choices[0].logprobs else [])]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_byte_fallback_tokens_are_named_by_their_text_and_carry_their_raw_bytes(served):
    r = served.completions.create(model="smollm2", prompt=CJK, max_tokens=6, temperature=0, logprobs=2)
    c = r.choices[0]
    tokens = c.logprobs.tokens
    assert "東" in c.text and not any("\ufffd" in t for t in tokens)
    assert "".join(tokens) == c.text and "" in tokens  # the lead bytes add nothing, the last byte the whole character
    assert all(c.text[o:].startswith(t) for o, t in zip(c.logprobs.text_offset, tokens))
    msgs = [{"role": "user", "content": "Repeat: " + CJK}, {"role": "assistant", "content": CJK}]
    ch = served.chat.completions.create(model="smollm2", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = ch.choices[0].logprobs.content
    assert not any("\ufffd" in t.token or any("\ufffd" in a.token for a in t.top_logprobs) for t in content)
    # The bytes are the tokens' own: put together they are the text (the EOS, if any, aside), whole characters only
    # across tokens; a lead-byte token carries its bytes though its string is empty.
    raw = b"".join(bytes(t.bytes) for t in content if t.token != "<|im_end|>")
    assert raw.decode("utf-8") == ch.choices[0].message.content == "".join(t.token for t in content if t.token != "<|im_end|>")
    assert any(t.token == "" and t.bytes for t in content)
    assert any(t.bytes != list(t.token.encode()) for t in content)


def test_an_explicit_max_tokens_past_the_context_is_vllms_400_on_a_direct_request(served):
    prompt_tokens = served.chat.completions.create(model="smollm2", messages=SAY_HI, max_tokens=1).usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as e:
        served.chat.completions.create(model="smollm2", messages=SAY_HI, max_tokens=9000)
    msg = e.value.body["message"]
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    assert (f"This model's maximum context length is 8192 tokens. However, you requested {prompt_tokens + 9000} tokens "
            f"({prompt_tokens} in the messages, 9000 in the completion). Please reduce the length of the messages or completion.") in msg
    with pytest.raises(openai.BadRequestError) as e:  # a stream: the same 400, before the stream starts
        list(served.chat.completions.create(model="smollm2", messages=SAY_HI, max_tokens=9000, stream=True))
    assert f"However, you requested {prompt_tokens + 9000} tokens" in e.value.body["message"]
    raw_tokens = served.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=1).usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as e:
        served.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8192)
    assert f"However, you requested {raw_tokens + 8192} tokens ({raw_tokens} in the prompt, 8192 in the completion)" in e.value.body["message"]
    assert e.value.body["param"] == "max_tokens", e.value.body
    # one that fits is served; the prompt alone past the context is a 400 too, with vLLM's words
    assert served.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=2, temperature=0).choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        served.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "word " * 9000}], max_tokens=4)
    assert "This model's maximum context length is 8192 tokens. However, your messages resulted in" in e.value.body["message"]
    assert e.value.body["message"].endswith(" tokens. Please reduce the length of the messages.")


def test_a_conversation_ending_with_the_assistant_is_answered_by_a_new_turn(served):
    """OpenAI and vLLM (its default ``continue_final_message: false``) open a new assistant turn after a final
    assistant message; the engine continued that message, so the client got the rest of its own text."""
    from transformers import AutoTokenizer

    from archon_server.engine.model_store import model_path

    convo = [{"role": "user", "content": "Say a word"}, {"role": "assistant", "content": "The word is"}]
    tok = AutoTokenizer.from_pretrained(model_path())  # the served model's own template, as the server converted it
    new_turn = len(tok.apply_chat_template(convo, tokenize=True, add_generation_prompt=True, return_dict=False))
    continued = len(tok.apply_chat_template(convo, tokenize=True, add_generation_prompt=False, continue_final_message=True,
                                             return_dict=False))
    assert new_turn != continued  # the test tells them apart
    for stream in (False, True):
        if stream:
            chunks = list(served.chat.completions.create(model="smollm2", messages=convo, max_tokens=4, temperature=0, stream=True,
                                                         stream_options={"include_usage": True}))
            usage = chunks[-1].usage
        else:
            usage = served.chat.completions.create(model="smollm2", messages=convo, max_tokens=4, temperature=0).usage
        assert usage.prompt_tokens == new_turn, (usage.prompt_tokens, new_turn, continued)
