"""End to end on the embedded model (`archon serve`, default config, the official openai SDK): logprobs in streams,
echo + logprobs on /v1/completions as lm-evaluation-harness's loglikelihood reads them, and logit_bias."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from archon_server.testing.server import serve_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is Paris"


@pytest.fixture(scope="module")
def served():
    log = ROOT / ".pytest_cache" / "e2e-logprobs-serve.log" if (ROOT / ".pytest_cache").is_dir() else None
    with serve_process(["serve"], log=log, cwd=str(ROOT)) as (_proc, url):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_streamed_completions_carry_legacy_logprobs(served):
    chunks = [ch.choices[0] for ch in served.completions.create(model="smollm2", prompt="The capital of France is", stream=True,
                                                                logprobs=2, max_tokens=4, temperature=0) if ch.choices]
    sent = 0
    with_lp = [c for c in chunks if c.logprobs is not None]
    assert len(with_lp) >= 3
    for c in chunks:
        if c.logprobs is not None:
            assert c.logprobs.text_offset[0] == sent and all(len(top) == 2 for top in c.logprobs.top_logprobs)
        sent += len(c.text)


def test_echo_with_logprobs_scores_the_prompt(served):
    """The tester's request: the prompt tokens' logprobs come first (the first null), text_offset indexes the text."""
    r = served.completions.create(model="smollm2", prompt=PROMPT, max_tokens=1, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith(PROMPT) and "".join(lp.tokens) == c.text
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens == r.usage.prompt_tokens + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(PROMPT)  # the generated token starts after the prompt
    assert all(c.text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens))
    # lm-evaluation-harness's loglikelihood: max_tokens 0, the prompt alone with its logprobs
    z = served.completions.create(model="smollm2", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert z.choices[0].text == PROMPT and z.usage.completion_tokens == 0 and z.choices[0].finish_reason == "length"
    assert z.choices[0].logprobs.tokens == lp.tokens[:-1] and z.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:-1], abs=1e-3)
    # a likelier continuation scores higher: " Paris" after "The capital of France is", rather than " Berlin"
    berlin = served.completions.create(model="smollm2", prompt=PROMPT.replace("Paris", "Berlin"), max_tokens=0, echo=True, logprobs=0)
    assert berlin.choices[0].logprobs.token_logprobs[-1] < z.choices[0].logprobs.token_logprobs[-1]
    streamed = [ch.choices[0] for ch in served.completions.create(model="smollm2", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, stream=True)
                if ch.choices]
    assert streamed[0].text == PROMPT and streamed[0].logprobs.tokens == z.choices[0].logprobs.tokens
    with pytest.raises(openai.BadRequestError) as e:
        served.completions.create(model="smollm2", prompt=PROMPT, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
