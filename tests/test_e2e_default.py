"""End to end on the embedded model: the README's serve command (default config), the official openai SDK."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from archon_server.testing.server import serve_process

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@pytest.fixture(scope="module")
def served():
    log = ROOT / ".pytest_cache" / "e2e-serve.log" if (ROOT / ".pytest_cache").is_dir() else None
    with serve_process(["serve"], log=log, cwd=str(ROOT)) as (_proc, url):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def english(text: str) -> bool:
    letters = sum(c.isalpha() for c in text)
    return letters > 5 and sum(c.isascii() for c in text) / len(text) > 0.9


def test_default_self_moa_answers_a_question(served):
    models = {m.id for m in served.models.list().data}
    assert "self-moa" in models and "smollm2" in models
    r = served.chat.completions.create(
        model="self-moa", messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=64, seed=1, extra_body={"return_trace": True},
    )
    text = r.choices[0].message.content
    assert english(text) and not any(t in text for t in TEMPLATE_TOKENS)
    assert "paris" in text.lower()
    assert r.choices[0].finish_reason in ("stop", "length")
    trace = r.model_extra["trace"]
    assert trace["calls"] == 2 and trace["layers"][0]["calls"][0]["n"] == 6  # six samples, one batched request
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_and_seed_reproducibility(served):
    msgs = [{"role": "user", "content": "Name three colours."}]
    chunks = [c.choices[0].delta.content or "" for c in served.chat.completions.create(model="self-moa", messages=msgs, max_tokens=40, seed=7, stream=True) if c.choices]
    text = "".join(chunks)
    assert sum(1 for c in chunks if c) > 3 and english(text) and not any(t in text for t in TEMPLATE_TOKENS)
    # Same seed -> same answer, streamed or not. Where the engine computes in float32 (a host without AVX512-BF16),
    # attention's last bits depend on the thread count, which the tuner changes when the cores get busy (README): a
    # pair that straddles such a change may differ. A difference between the two paths would show in every pair.
    pairs = []
    for _ in range(3):
        a = served.chat.completions.create(model="self-moa", messages=msgs, max_tokens=40, seed=7).choices[0].message.content
        pairs.append((text, a))
        if a == text:
            break
        text = "".join(c.choices[0].delta.content or "" for c in served.chat.completions.create(
            model="self-moa", messages=msgs, max_tokens=40, seed=7, stream=True) if c.choices)
    assert pairs[-1][0] == pairs[-1][1], pairs


def test_stop_strings_and_length(served):
    r = served.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}], max_tokens=60, temperature=0, stop=["7"])
    text = r.choices[0].message.content
    assert "7" not in text and r.choices[0].finish_reason == "stop" and re.search(r"\b[1-6]\b", text)
    r = served.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=8)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8


def test_scoring_presets_in_the_default_server(served):
    """The three scoring presets through the README's server with the SDK, one after another and again, mixed with
    a plain request: scores in the trace, the answer is the top-scored sample, no verdict is ever generated."""
    msgs = [{"role": "user", "content": "Give me one tip for learning a language."}]
    short = {"architecture": {"defaults": {"max_tokens": 40}}, "return_trace": True}
    for name, pairwise in (("best-of-n-cdr", False), ("best-of-n-judge", True), ("self-moa-rank", False), ("best-of-n-cdr", False)):
        r = served.chat.completions.create(model=name, messages=msgs, max_tokens=40, seed=3, extra_body=short)
        text = r.choices[0].message.content
        assert english(text) and not any(t in text for t in TEMPLATE_TOKENS), (name, text)
        trace = r.model_extra["trace"]
        layer = next(lt for lt in trace["layers"] if any("scorer0:" in n for n in lt["notes"]))
        if any("nothing to score" in n for n in layer["notes"]):  # one sample complete: kept without a scoring call
            assert not layer["calls"] and len(layer["candidates"]) == 1, layer
            continue
        calls = [c for c in layer["calls"] if c["type"] == "scorer"]
        # The scorer scores the complete samples only when some were cut at max_tokens (the others are set aside,
        # named in a note): which ones are cut at 40 tokens is the model's doing. Every sample is either scored or
        # set aside; the density ratio is 2 calls (strong, weak), the pairwise judge both orders of every scored pair.
        [scored_note] = [n for n in layer["notes"] if " scores [" in n]
        scored = [int(i) for i in re.findall(r"\[(\d+)\] ", scored_note.split(" scores ", 1)[1].split("; kept")[0])]
        aside = [int(i) for n in layer["notes"] if "set aside" in n for i in re.findall(r"\[(\d+)\]", n)]
        assert scored and sorted(scored + aside) == list(range(1, len(scored) + len(aside) + 1)), layer["notes"]
        want = len(scored) * (len(scored) - 1) if pairwise else 2
        assert len(calls) == want and all(c["ok"] and c["completion_tokens"] == 0 for c in calls), (name, want, calls)
        kept = layer["candidates"]
        assert kept and all(c["score"] is not None for c in kept)
        if name != "self-moa-rank":  # the final answer is the best-scored sample (self-moa-rank fuses its top 3)
            assert text == max(kept, key=lambda c: c["score"])["text"]
        else:  # its top 3 (fewer when fewer than 3 samples were complete and scored)
            assert len(kept) == min(3, len(scored)), (len(kept), scored)
    r = served.chat.completions.create(model="smollm2", messages=msgs, max_tokens=20)
    assert english(r.choices[0].message.content)


def test_responses_completions_and_structured_outputs_on_the_embedded_model(served):
    """The rest of the OpenAI API on the running default server, one request after another as a client would."""
    r = served.responses.create(model="smollm2", input="What is the capital of France? One sentence.", instructions="Answer briefly.",
                                max_output_tokens=40, temperature=0)
    assert r.status in ("completed", "incomplete") and english(r.output_text) and r.usage.output_tokens > 0
    # A sentence, not one word: "Name a fruit." got "Alef." once, too short to tell English by (english() wants 6 letters).
    with served.responses.stream(model="self-moa", input="Name a fruit and its colour in one short sentence.", max_output_tokens=32,
                                 temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    final = events[-1].response  # OpenAI's last event: response.completed, or response.incomplete if max_output_tokens cut it
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete") and "response.output_text.delta" in kinds
    assert (kinds[-1] == "response.incomplete") == (final.status == "incomplete")
    assert english(final.output_text) and not any(t in final.output_text for t in TEMPLATE_TOKENS)
    c = served.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, echo=True, logprobs=2, temperature=0)
    assert c.choices[0].text.startswith("The capital of France is")
    # echo: the prompt's tokens come first in logprobs (the first one's null), then the generated ones (as vLLM)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == c.usage.prompt_tokens + c.usage.completion_tokens and lp.token_logprobs[0] is None
    # Structured output on the embedded engine is constrained decoding (llguidance): valid on the first run.
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}}, "required": ["city", "country"],
              "additionalProperties": False}
    for model in ("smollm2", "self-moa"):
        j = served.chat.completions.create(model=model, messages=[{"role": "user", "content": "Give the capital of France and its country."}],
                                           max_tokens=60, seed=3, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
                                           extra_body={"return_trace": True})
        value = json.loads(j.choices[0].message.content)
        assert set(value) == {"city", "country"} and all(isinstance(v, str) for v in value.values())
        assert j.model_extra["trace"]["calls"] == (1 if model == "smollm2" else 2)  # no retry was needed
    with pytest.raises(openai.BadRequestError) as e:
        served.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert "'smollm2'" in e.value.body["message"] and "cannot call tools" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        served.embeddings.create(model="smollm2", input="x")


def test_disconnect_cancels_generation():
    from archon_server.api.app import build_app
    from archon_server.config import default_config
    from archon_server.testing.server import ServerThread

    app = build_app(default_config())
    with ServerThread(app) as srv:
        backend = app.state.registry.get("smollm2")
        body = {"model": "smollm2", "stream": True, "max_tokens": 2000, "messages": [{"role": "user", "content": "Write a very long essay about the sea."}]}
        with httpx.Client(timeout=60) as h, h.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if '"content"' in line and '"content":""' not in line:
                    break
            assert backend.engine.active_sequences == 1
        deadline = time.time() + 20
        while time.time() < deadline and backend.engine.active_sequences:
            time.sleep(0.1)
        assert backend.engine.active_sequences == 0


def metric(text: str, name: str) -> float:
    """The value of a ``name{backend="smollm2"}`` sample (the embedded backend) in a Prometheus exposition."""
    m = re.search(rf'^{name}{{backend="smollm2"}} (\S+)$', text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_engine_counters_show_in_metrics(served):
    """The embedded engine's counters are in /metrics, the prefix cache's among them (on by default): a second
    question under the same long system prompt reuses the first one's blocks."""
    url = str(served.base_url.join("/metrics"))
    text = httpx.get(url).text
    before, hits = metric(text, "archon_backend_prefill_tokens_total"), metric(text, "archon_backend_prefix_hit_tokens_total")
    system = {"role": "system", "content": "You answer arithmetic questions with the number alone. " * 12}
    for q in ("What is 2 + 2?", "What is 3 + 5?"):
        served.chat.completions.create(model="smollm2", messages=[system, {"role": "user", "content": q}], max_tokens=4, temperature=0)
    text = httpx.get(url).text
    assert metric(text, "archon_backend_prefill_tokens_total") > before
    assert metric(text, "archon_backend_prefix_hit_tokens_total") - hits >= 96  # the system prompt's whole blocks
    assert 0 < metric(text, "archon_backend_prefix_hit_rate") <= 1


def test_sampling_extras_reach_the_embedded_engine(served):
    """vLLM's extra sampling params through the SDK's extra_body, one request after another into the running server: each
    changes what the engine generates (they had been dropped silently); min_tokens above max_tokens is refused before any
    work, as vLLM refuses it."""
    hi = [{"role": "user", "content": "Say hi."}]
    plain = served.chat.completions.create(model="smollm2", messages=hi, max_tokens=48, temperature=0)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 48  # the model stops by itself...
    full = served.chat.completions.create(model="smollm2", messages=hi, max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 48  # ...unless told to go on
    hot = [served.chat.completions.create(model="smollm2", messages=hi, max_tokens=16, temperature=1.5, seed=s, extra_body={"top_k": 1})
           .choices[0].message.content for s in (1, 2)]
    assert hot[0] == hot[1]  # top_k 1 is greedy whatever the seed and temperature
    count = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]
    greedy = served.chat.completions.create(model="smollm2", messages=count, max_tokens=40, temperature=0).choices[0].message.content
    penalized = served.chat.completions.create(model="smollm2", messages=count, max_tokens=40, temperature=0,
                                               extra_body={"repetition_penalty": 1.8}).choices[0].message.content
    assert penalized != greedy
    # (asked bare, SmolLM2's first token is a near-tie, "The" 25.325 against "L" 25.243 in float32, that bf16 may
    # break either way: on the Xeon with AMX it rambled on past 40 tokens)
    capital = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
    short = served.chat.completions.create(model="smollm2", messages=capital, max_tokens=40, temperature=0)
    held = served.chat.completions.create(model="smollm2", messages=capital, max_tokens=40, temperature=0, extra_body={"min_tokens": 20})
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 20  # (8 tokens: "...is Paris.")
    assert held.usage.completion_tokens >= 20 and held.choices[0].message.content.startswith(short.choices[0].message.content)
    with pytest.raises(openai.BadRequestError) as e:  # vLLM's rule
        served.chat.completions.create(model="self-moa", messages=hi, max_tokens=16, extra_body={"min_tokens": 40})
    assert e.value.body["param"] == "min_tokens"
    cut = served.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "A JSON object with a key colour."}],
                                         max_tokens=4, response_format={"type": "json_object"})
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith("{")
    assert served.models.retrieve("self-moa").id == "self-moa"
