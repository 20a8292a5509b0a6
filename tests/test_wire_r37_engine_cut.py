"""On the tiny random Llama of test_engine_faults (2,048 positions, seconds, no download): the engine cuts a
generation at the context's end unless the request asks it to refuse (what the API asks for a direct request with an
explicit max_tokens), and then raises ContextOverflow with vLLM's message, which the local backend makes a 400."""

from __future__ import annotations

import pytest
from test_engine_faults import tiny_folder  # noqa: F401 - a fixture
from test_engine_logprobs_bias import backend  # noqa: F401 - a fixture

from archon_server.backends.base import REFUSE_OVERFLOW, BackendError, CompletionRequest, SamplingParams
from archon_server.backends.local import LocalBackend
from archon_server.exceptions import ArchonError, ContextOverflow

PROMPT = "abcdefghij" * 3  # 30 tokens


async def test_past_the_context_an_inner_call_is_cut_and_a_flagged_one_refused(backend: LocalBackend):  # noqa: F811
    limit = backend.engine.runner.dims.max_positions
    cut = await backend.complete(CompletionRequest("tiny", PROMPT, SamplingParams(max_tokens=limit, temperature=0.0)))
    assert cut.choices[0].finish_reason == "length" and cut.usage.prompt_tokens + cut.usage.completion_tokens == limit
    flagged = SamplingParams(max_tokens=limit - 29, temperature=0.0, extra={REFUSE_OVERFLOW: True})
    with pytest.raises(BackendError) as e:
        await backend.complete(CompletionRequest("tiny", PROMPT, flagged))
    assert e.value.status == 400 and isinstance(e.value.__cause__, ContextOverflow) and isinstance(e.value.__cause__, ArchonError)
    assert str(e.value.__cause__) == (f"This model's maximum context length is {limit} tokens. However, you requested {limit + 1} tokens "
                                      f"(30 in the messages, {limit - 29} in the completion). Please reduce the length of the messages or completion.")
    fits = await backend.complete(CompletionRequest("tiny", PROMPT, SamplingParams(max_tokens=4, temperature=0.0, extra={REFUSE_OVERFLOW: True})))
    assert fits.usage.completion_tokens == 4
    with pytest.raises(BackendError) as e:
        await backend.complete(CompletionRequest("tiny", "a" * limit, SamplingParams(max_tokens=1)))
    assert isinstance(e.value.__cause__, ContextOverflow) and e.value.__cause__.max_tokens is None and e.value.status == 400
