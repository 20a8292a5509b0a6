"""A judge cut at its verdict on the real embedded engine, next to requests that run on.

The cut stream sits in slot 0 of the batch, so dropping it moves the other rows' KV cache down
(engine compaction outside a model step): that path used to fail every request in the batch.
"""

from __future__ import annotations

import asyncio

import pytest

from archon_server.backends.base import ChatRequest, SamplingParams
from archon_server.bench import judges as jd

STORY = [{"role": "user", "content": "Tell me a long story about a dragon who learns to bake bread."}]


@pytest.fixture(scope="module")
def backend(embedded_backend):
    return embedded_backend


async def test_cut_judge_streams_leave_the_rest_of_the_batch_running(backend):
    def req(seed: int) -> ChatRequest:
        return ChatRequest("smollm2-135m-instruct", STORY, SamplingParams(temperature=0.8, max_tokens=120, seed=seed))

    long_prompt = [{"role": "user", "content": "Judge this answer. " + "The dragon kneads dough by the river. " * 150}]

    async def cut_after(seed: int, chars: int):
        return await jd.chat_until(backend, req(seed), lambda text: len(text) > chars)

    async def long_one(seed: int):
        await asyncio.sleep(0.05 * seed)  # arrive while the cut streams are decoding: their prompts are prefilled in pieces
        return await backend.chat(ChatRequest("smollm2-135m-instruct", long_prompt, SamplingParams(temperature=0.8, max_tokens=40, seed=seed)))

    # four streams are cut at different points (slots 0..3) while two long prompts are prefilled and decoded
    results = await asyncio.gather(*(cut_after(i, c) for i, c in enumerate((10, 30, 60, 100))), long_one(1), long_one(2))
    for cut in results[:4]:
        assert cut.choices[0].finish_reason == "stop" and 10 < len(cut.choices[0].text) < 600
    for full in results[4:]:
        assert full.choices[0].finish_reason in ("length", "stop") and full.choices[0].text
    # and the engine still serves
    again = await backend.chat(req(5))
    assert again.choices[0].text


async def test_mmlu_logprob_mode_on_the_embedded_model(backend):
    import math

    from archon_server.bench import datasets as ds
    from archon_server.bench.grading import grade_mmlu_logprob

    for it in ds.load_mmlu(subjects=["anatomy"])[:3]:
        g = await grade_mmlu_logprob(backend, "smollm2-135m-instruct", it)
        lps = g.detail["logprobs"]
        assert g.extracted in "ABCD" and set(lps) == set("ABCD")
        assert all(math.isfinite(v) and v < 0 for v in lps.values()) and lps[g.extracted] == max(lps.values())
