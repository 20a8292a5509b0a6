"""Teacher-forced scoring on the embedded engine (real SmolLM2-135M-Instruct, float32 so no int8 rounding).

The reference is the engine's own generation: the log-probabilities it reports for the tokens it sampled
must equal a scoring pass over the same text.  Scoring shares the worker thread with generation, so the
tests also walk the path a server walks: scoring while other requests decode, repeatedly, with bad input.
"""

from __future__ import annotations

import asyncio

import pytest

from archon_server.backends.base import (
    BackendError,
    ChatRequest,
    NextTokenRequest,
    SamplingParams,
    ScoreRequest,
)
from archon_server.backends.local import LocalBackend
from archon_server.engine.loader import load_engine

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def shared():
    engine, loaded = load_engine(dtype="float32", progress=False)
    yield engine, loaded
    engine.shutdown()


@pytest.fixture
def backend(shared) -> LocalBackend:
    b = LocalBackend(progress=False)
    b.engine, b.loaded = shared
    return b


def chat(messages, **params) -> ChatRequest:  # type: ignore[no-untyped-def]
    return ChatRequest("smollm2-135m-instruct", messages, SamplingParams(**params))


async def test_teacher_forced_logprob_equals_generation_logprobs(backend: LocalBackend) -> None:
    """Sampled (seeded) and greedy generations: the score of the generated text is the sum of the logprobs
    generation reported for the same tokens, token by token."""
    for params in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7}):
        res = await backend.chat(chat(STORY, max_tokens=40, logprobs=True, **params))
        c = res.choices[0]
        gen = [t.logprob for t in c.logprobs or []]
        assert len(gen) >= 10
        s = (await backend.score(ScoreRequest("m", STORY, [c.text]))).scores[0]
        assert s.num_tokens == len(gen), (s.tokens, [t.token for t in c.logprobs or []])
        assert s.tokens == [t.token for t in c.logprobs or []]
        for a, b in zip(s.token_logprobs, gen):
            assert a == pytest.approx(b, abs=2e-3)
        assert s.logprob == pytest.approx(sum(gen), abs=1e-2)


async def test_batched_scores_equal_scores_alone(backend: LocalBackend) -> None:
    """One batch of candidates of different lengths (shared prompt prefill, padding) = each scored alone."""
    cands = ["Paris.", "The capital of France is Paris, a city on the Seine.", "I do not know.", ""]
    together = (await backend.score(ScoreRequest("m", QUESTION, cands))).scores
    for cand, s in zip(cands, together):
        alone = (await backend.score(ScoreRequest("m", QUESTION, [cand]))).scores[0]
        assert s.num_tokens == alone.num_tokens
        assert s.logprob == pytest.approx(alone.logprob, abs=1e-3)
    assert together[3].num_tokens == 0 and together[3].logprob == 0.0
    # A fluent right answer beats word salad of the same length.
    salad = (await backend.score(ScoreRequest("m", QUESTION, ["Paris of is capital France the."]))).scores[0]
    right = (await backend.score(ScoreRequest("m", QUESTION, ["The capital of France is Paris."]))).scores[0]
    assert right.logprob > salad.logprob + 5


async def test_next_token_top_equals_generation_top_logprobs(backend: LocalBackend) -> None:
    res = await backend.chat(chat(QUESTION, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=5))
    gen_top = res.choices[0].logprobs[0].top  # type: ignore[index]
    nxt = await backend.next_token_logprobs(NextTokenRequest("m", QUESTION, top_k=5))
    assert [t for t, _ in nxt.top] == [t for t, _ in gen_top]
    for (_, a), (_, b) in zip(nxt.top, gen_top):
        assert a == pytest.approx(b, abs=1e-3)
    # A final assistant message is continued: the next token after "The capital of France is".
    cont = await backend.next_token_logprobs(NextTokenRequest("m", QUESTION + [{"role": "assistant", "content": "The capital of France is"}], 3))
    assert cont.top[0][0].strip() == "Paris"
    assert cont.prob_of("Paris") > 0.5


async def test_scoring_interleaves_with_generation_and_survives_bad_input(backend: LocalBackend) -> None:
    """Scores while a long generation decodes; the generation's greedy text is unchanged by it; a too-long
    candidate fails only its own call; the engine keeps serving both kinds of call afterwards."""
    alone = (await backend.chat(chat(STORY, max_tokens=60, temperature=0.0))).choices[0].text
    gen = asyncio.create_task(backend.chat(chat(STORY, max_tokens=60, temperature=0.0)))
    scores = await asyncio.gather(*(backend.score(ScoreRequest("m", QUESTION, ["Paris.", "Lyon."])) for _ in range(4)))
    assert (await gen).choices[0].text == alone
    assert len({round(s.scores[0].logprob, 4) for s in scores}) == 1
    with pytest.raises(BackendError) as e:
        await backend.score(ScoreRequest("m", QUESTION, ["word " * 9000]))
    assert e.value.status == 400 and "context" in str(e.value)
    again = await backend.score(ScoreRequest("m", QUESTION, ["Paris."]))
    assert again.scores[0].logprob == pytest.approx(scores[0].scores[0].logprob, abs=1e-4)
    assert (await backend.chat(chat(STORY, max_tokens=60, temperature=0.0))).choices[0].text == alone


async def test_density_ratio_ranks_a_known_better_text_above_corrupted_ones(backend: LocalBackend) -> None:
    """CDR with the embedded instruct model over the gemma3-270m base model (different tokenizer and no chat
    template): the right answer beats its shuffled words, an off-topic answer and a truncated one."""
    from archon_server.backends.registry import BackendRegistry
    from archon_server.components import FinalOverrides
    from archon_server.components.state import Candidate
    from archon_server.graph.runtime import GraphRuntime
    from archon_server.spec import parse_architecture

    good = ("1. Keep a regular schedule: go to bed and wake up at the same time every day.\n"
            "2. Avoid screens and caffeine in the hour before bed.")
    shuffled = "regular time up 2. go 1. bed caffeine schedule: the Keep and in to every before same and at the screens a wake hour Avoid day. bed."
    offtopic = "The stock market fell by two percent on Tuesday after the central bank raised interest rates."
    cands = [shuffled, offtopic, good, "1. Keep a regular"]

    class Fixed(LocalBackend):  # generation replaced by the fixed candidates; scoring is the real engine's
        async def chat(self, request: ChatRequest):  # type: ignore[no-untyped-def, override]
            from archon_server.backends.base import ChatResult, Choice

            return ChatResult([Choice(t, index=i) for i, t in enumerate(cands)])

    gen = Fixed(progress=False)
    gen.engine, gen.loaded = backend.engine, backend.loaded
    weak = LocalBackend("gemma3-270m", progress=False, lazy=True)  # what the default config binds to `weak`
    reg = BackendRegistry()
    reg.register("default", gen)
    reg.register("weak", weak)
    spec = parse_architecture({"name": "cdr", "layers": [[{"type": "generator", "model": "default", "samples": 4}],
                                                         [{"type": "scorer", "method": "density_ratio", "model": "default", "weak": "weak", "top_k": 4}]]})
    try:
        res = await GraphRuntime(reg).run(spec, [{"role": "user", "content": "Give me two tips for sleeping better."}], final=FinalOverrides(n=4))
    finally:
        await weak.close()
    ranked: list[Candidate] = res.candidates
    assert ranked[0].text == good, [(c.text[:20], c.score) for c in ranked]
    assert ranked[-1].text in (shuffled, offtopic)
    parts = ranked[0].meta["scorer"]
    assert parts["logp_strong"] - parts["logp_weak"] == pytest.approx(ranked[0].score)
    scorer_calls = [c for layer in res.trace.layers for c in layer.calls if c.type == "scorer"]
    assert sorted(c.model for c in scorer_calls) == ["default", "weak"] and all(c.ok and c.n == 4 for c in scorer_calls)


def test_scoring_reads_the_lm_head_once_per_forward_not_once_per_candidate(shared, monkeypatch) -> None:
    """Teacher-forced scoring puts every candidate's positions of a forward through the LM head in one product (in
    chunks the packed weights take) and skips the head where only hidden states are needed (the prompt's prefill):
    a per-candidate product read the whole head once per candidate (gemma3-270m's is 671 MB; 8 candidates 2.2 ->
    1.0 s). Same log-probs as scoring each candidate alone."""
    import math

    from archon_server.engine.scoring import score_continuations

    _, loaded = shared
    runner, tok = loaded.runner, loaded.tokenizer
    prompt = tok("Question: what is the capital of France? Answer:")["input_ids"]
    candidates = [tok(f" Paris{' is the capital' * i}.")["input_ids"] for i in range(6)]
    heads: list[int] = []
    real = runner._linear

    def counting(x, w, small, bias=None, exact=False):
        if w is runner.lm_head:
            heads.append(x.numel() // x.shape[-1])
        return real(x, w, small, bias, exact)

    monkeypatch.setattr(runner, "_linear", counting)
    together = score_continuations(runner, prompt, candidates)
    positions = sum(len(c) for c in candidates)
    chunk = runner.packed_max_rows if runner.packed else positions
    assert sum(heads) == positions and len(heads) == math.ceil(positions / chunk) < len(candidates)
    monkeypatch.setattr(runner, "_linear", real)
    for cand, scored in zip(candidates, together):
        (alone,) = score_continuations(runner, prompt, [cand])
        assert scored.token_ids == cand and max(abs(a - b) for a, b in zip(scored.logprobs, alone.logprobs)) < 1e-4
