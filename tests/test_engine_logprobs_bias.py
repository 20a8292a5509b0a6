"""On the tiny random Llama of test_engine_faults (seconds, no download): logit_bias in the engine's sampler, the
local backend's echoed prompt log-probs (legacy completions' echo + logprobs, lm-evaluation-harness's loglikelihood)
and its streamed logprobs."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_engine_faults import VOCAB, LetterTokenizer, idle, run, tiny_folder  # noqa: F401 - tiny_folder is a fixture

from archon_server.backends.base import BackendError, ChatRequest, CompletionRequest, SamplingParams
from archon_server.backends.local import LocalBackend
from archon_server.engine.runner import ModelRunner
from archon_server.engine.scheduler import Engine, TokenEvent
from archon_server.engine.scoring import score_continuations


class TextTokenizer(LetterTokenizer):
    """Letters in, letters out: ``"abc"`` is tokens 0, 1, 2 (what a raw completion's prompt goes through)."""

    chat_template = None

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) - ord("a") for c in text]}


@pytest.fixture(scope="module")
def backend(tiny_folder: Path):  # noqa: F811 - the imported fixture
    engine = Engine(ModelRunner(tiny_folder, device="cpu", dtype="float32"), TextTokenizer(), eos_ids=set(), max_batch=4,
                    idle_poll_s=0.05, threads=1, prefix_cache_mb=0)
    engine.start()
    b = LocalBackend(progress=False)
    b.engine, b.loaded = engine, SimpleNamespace(tokenizer=engine.tokenizer)
    yield b
    engine.shutdown()


def token_logprobs(sink: Any) -> list[tuple[int, float]]:
    return [(ord(lp.token) - ord("a"), lp.logprob) for e in sink.events if isinstance(e, TokenEvent) and e.logprobs for lp in e.logprobs]


def test_logit_bias_steers_the_draw_and_leaves_the_reported_logprobs_alone(backend: LocalBackend):
    engine = backend.engine
    plain = run(engine, 20, max_tokens=6, logprobs=True).wait()
    first = plain.texts()[0][0]
    target = next(t for t in (5, 6, 7) if chr(ord("a") + t) != first)  # a letter greedy decoding did not pick first
    biased = run(engine, 20, max_tokens=6, logprobs=True, logit_bias={target: 100.0}).wait()
    assert biased.texts()[0] == chr(ord("a") + target) * 6
    # logprobs are the model's own (vLLM's default): the biased token is not suddenly certain
    lps = token_logprobs(biased)
    assert [t for t, _ in lps] == [target] * 6 and all(lp < -0.5 for _, lp in lps)
    # a strong negative bias bans a token, sampled or greedy
    banned = run(engine, 20, max_tokens=6, temperature=1.0, seed=3, logit_bias={t: -100.0 for t in range(VOCAB) if t % 26 == 0}).wait()
    assert "a" not in banned.texts()[0]
    with pytest.raises(ValueError, match="logit_bias"):
        run(engine, 20, max_tokens=2, logit_bias={VOCAB: 1.0})
    idle(engine)


def test_an_out_of_vocabulary_logit_bias_is_the_backends_400(backend: LocalBackend):
    params = SamplingParams(temperature=0, max_tokens=2, extra={"logit_bias": {str(VOCAB + 5): 2.0}})
    with pytest.raises(BackendError) as e:
        asyncio.run(backend.chat(ChatRequest("tiny", [{"role": "user", "content": "abc"}], params)))
    assert e.value.status == 400 and "logit_bias" in str(e.value) and str(VOCAB + 5) in str(e.value)


def test_forced_scores_carry_the_top_alternatives(backend: LocalBackend):
    prompt, cont = [1, 2, 3], [4, 5, 6, 7]
    (plain,) = backend.engine.run_job(lambda r: score_continuations(r, prompt, [cont])).result(60)
    (forced,) = backend.engine.run_job(lambda r: score_continuations(r, prompt, [cont], top=3)).result(60)
    assert plain.top is None and forced.logprobs == plain.logprobs and len(forced.top) == len(cont)
    for lp, (tid, top) in zip(forced.logprobs, zip(cont, forced.top)):
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] and top[0][1] >= lp - 1e-6
        assert all(v <= 0 for _, v in top) and (tid not in dict(top) or dict(top)[tid] == pytest.approx(lp, abs=1e-5))


def complete(backend: LocalBackend, prompt: str, **params: Any) -> Any:
    echo = params.pop("echo", True)
    return asyncio.run(backend.complete(CompletionRequest("tiny", prompt, SamplingParams(**{"temperature": 0.0, **params}), echo=echo)))


async def _stream(backend: LocalBackend, req: CompletionRequest) -> list[Any]:
    return [ch async for ch in backend.stream_complete(req)]


def test_echo_with_logprobs_scores_the_prompt_as_vllm_does(backend: LocalBackend):
    prompt = "hellothere"
    res = complete(backend, prompt, max_tokens=3, logprobs=True, top_logprobs=2)
    c = res.choices[0]
    assert c.text.startswith(prompt) and len(c.text) == len(prompt) + 3
    tokens = [t.token for t in c.logprobs]
    assert "".join(tokens) == c.text and len(tokens) == len(prompt) + 3
    first, rest = c.logprobs[0], c.logprobs[1:]
    assert first.token == "h" and first.logprob is None and first.top is None  # nothing predicts the first token
    assert all(isinstance(t.logprob, float) and t.logprob <= 0 and len(t.top) == 2 for t in rest)
    assert res.usage.prompt_tokens == len(prompt) and res.usage.completion_tokens == 3
    # Aligned: the prompt with the greedy continuation, echoed without generating, scores that continuation as
    # generation did (token i by the positions before it, not one off)
    whole = complete(backend, c.text, max_tokens=0, logprobs=True, top_logprobs=2).choices[0]
    assert whole.text == c.text and whole.finish_reason == "length"
    assert [t.token for t in whole.logprobs] == tokens
    assert [t.logprob for t in whole.logprobs[1:]] == pytest.approx([t.logprob for t in rest], abs=1e-4)
    assert [dict(t.top) for t in whole.logprobs[-3:]] == [pytest.approx(dict(t.top), abs=1e-4) for t in c.logprobs[-3:]]
    # max_tokens 0: the prompt alone, no tokens generated
    zero = complete(backend, prompt, max_tokens=0, logprobs=True, top_logprobs=1)
    assert zero.choices[0].text == prompt and len(zero.choices[0].logprobs) == len(prompt)
    assert (zero.usage.prompt_tokens, zero.usage.completion_tokens) == (len(prompt), 0)
    # without logprobs, echo is the text alone
    plain = complete(backend, prompt, max_tokens=2)
    assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None


def test_a_streamed_echo_carries_the_prompts_logprobs_then_each_tokens(backend: LocalBackend):
    prompt = "streamme"
    req = CompletionRequest("tiny", prompt, SamplingParams(temperature=0.0, max_tokens=4, logprobs=True, top_logprobs=1, n=2), echo=True)
    chunks = asyncio.run(_stream(backend, req))
    whole = complete(backend, prompt, max_tokens=4, logprobs=True, top_logprobs=1, n=2)
    for i in range(2):
        pieces = [ch for ch in chunks if ch.index == i and ch.usage is None and (ch.text or ch.logprobs)]
        assert pieces[0].text == prompt and pieces[0].logprobs[0].logprob is None and len(pieces[0].logprobs) == len(prompt)
        assert all(len(p.logprobs) == 1 and p.logprobs[0].token == p.text for p in pieces[1:])  # one token, its text
        streamed = [t for p in pieces for t in p.logprobs]
        assert [t.token for t in streamed] == [t.token for t in whole.choices[i].logprobs]
        assert [t.logprob for t in streamed[1:]] == pytest.approx([t.logprob for t in whole.choices[i].logprobs[1:]], abs=1e-4)
    zero = asyncio.run(_stream(backend, CompletionRequest("tiny", prompt, SamplingParams(max_tokens=0, logprobs=True), echo=True)))
    assert [(ch.text, ch.finish_reason) for ch in zero if ch.usage is None] == [(prompt, None), ("", "length")]
    assert zero[-1].usage.completion_tokens == 0


def test_streamed_chat_tokens_carry_their_logprobs(backend: LocalBackend):
    req = ChatRequest("tiny", [{"role": "user", "content": "abc"}], SamplingParams(temperature=0.0, max_tokens=5, logprobs=True, top_logprobs=2))

    async def go() -> list[Any]:
        return [ch async for ch in backend.stream(req)]

    pieces = [ch for ch in asyncio.run(go()) if ch.text or ch.logprobs]
    whole = asyncio.run(backend.chat(req)).choices[0]
    assert "".join(p.text for p in pieces) == whole.text
    streamed = [t for p in pieces for t in p.logprobs]
    assert [t.token for t in streamed] == [t.token for t in whole.logprobs]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole.logprobs], abs=1e-4)


class BosTextTokenizer(TextTokenizer):
    """A prompt starts with a special BOS (token 299: "<s>" decoded alone, nothing in the text) and "é" is two byte
    tokens (297, 298) that decode to U+FFFD alone and to "é" together, as a SentencePiece tokenizer's byte fallback
    (gemma3-270m's) does: decoding each id alone no longer gives the prompt's text."""

    BOS, E1, E2 = 299, 297, 298

    def __call__(self, text: str) -> dict[str, list[int]]:
        ids = [self.BOS]
        for ch in text:
            ids += [self.E1, self.E2] if ch == "é" else [ord(ch) - ord("a")]
        return {"input_ids": ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        out, i = [], 0
        while i < len(ids):
            t = ids[i]
            if t == self.BOS:
                out.append("" if skip_special_tokens else "<s>")
            elif t == self.E1 and i + 1 < len(ids) and ids[i + 1] == self.E2:
                out.append("é")
                i += 1
            elif t in (self.E1, self.E2):
                out.append("\ufffd")
            else:
                out.append(chr(ord("a") + t % 26))
            i += 1
        return "".join(out)


def test_echoed_tokens_concatenate_to_the_prompt_with_a_bos_and_byte_tokens(backend: LocalBackend):
    """The echoed tokens' strings are their pieces of the decoded text (the streams' incremental decoding), not each id
    decoded alone ("<s>", U+FFFD): they concatenate to the prompt, so legacy text_offset indexes the returned text."""
    from archon_server.api.logprobs import legacy_logprobs

    tok = BosTextTokenizer()
    saved = backend.loaded
    backend.loaded = SimpleNamespace(tokenizer=tok)
    try:
        prompt = "caféabc"
        c = complete(backend, prompt, max_tokens=0, logprobs=True, top_logprobs=2).choices[0]
    finally:
        backend.loaded = saved
    tokens = [t.token for t in c.logprobs]
    assert len(tokens) == len(tok(prompt)["input_ids"]) == len(prompt) + 2
    assert "".join(tokens) == c.text == prompt
    assert tokens[:6] == ["", "c", "a", "f", "", "é"]  # BOS, then the character with its last byte token
    offsets = legacy_logprobs(c.logprobs, 0)["text_offset"]
    assert [c.text[o : o + len(t)] for o, t in zip(offsets, tokens)] == tokens
    assert all(t.token in dict(t.top) or len(t.top) == 2 for t in c.logprobs[1:])


def test_a_long_echo_scoring_takes_turns_with_a_decoding_stream(backend: LocalBackend):
    """An echoed prompt of ~1,500 tokens is scored in prefill-sized steps that take turns with the decode steps (as a
    long prompt's prefill chunks do): the stream beside it keeps getting tokens before the scoring ends, where one
    un-chunked pass held every stream for its whole length."""
    engine = backend.engine
    saved = engine.prefill_chunk, engine.prefill_chunk_idle
    engine.prefill_chunk = engine.prefill_chunk_idle = 32
    long_prompt = "".join(chr(ord("a") + (7 * i + 3) % 26) for i in range(1500))
    order: list[str] = []

    async def go() -> Any:
        req = ChatRequest("tiny", [{"role": "user", "content": "abc"}], SamplingParams(temperature=0.0, max_tokens=1900))
        first = asyncio.Event()

        async def consume() -> None:
            async for ch in backend.stream(req):
                if ch.text:
                    order.append("token")
                    first.set()
                if len(order) > 1 and order[-2] == "echo done":  # the scoring has ended: this stream may go
                    return

        stream = asyncio.create_task(consume())
        await first.wait()
        order.append("echo sent")
        res = await backend.complete(CompletionRequest("tiny", long_prompt, SamplingParams(temperature=0.0, max_tokens=0, logprobs=True), echo=True))
        order.append("echo done")
        await stream
        return res

    steps0, interleaved0 = engine.stats.job_steps, engine.stats.job_steps_interleaved
    try:
        res = asyncio.run(go())
    finally:
        engine.prefill_chunk, engine.prefill_chunk_idle = saved
    assert res.choices[0].text == long_prompt and len(res.choices[0].logprobs) == len(long_prompt)
    steps = engine.stats.job_steps - steps0
    assert steps >= 1500 // 32 and engine.stats.job_steps_interleaved - interleaved0 >= steps - 2
    during = order[order.index("echo sent") + 1 : order.index("echo done")]
    assert during.count("token") >= 20, order  # one un-chunked pass let through at most the step in flight's token
    idle(engine)


def test_a_cancelled_scoring_job_stops_before_its_next_step(backend: LocalBackend):
    """The awaiting task cancelled (a deadline, a client gone) cancels the job's future; the engine drops it before its
    next step instead of running the whole pass for nobody."""
    from archon_server.engine.scoring import score_steps

    engine = backend.engine
    first_step, gate, closed = threading.Event(), threading.Event(), threading.Event()
    ran = []

    def gated(runner: Any) -> Any:  # score_steps, held after its first step until the test has cancelled it
        inner = score_steps(runner, [1, 2], [[(5 * i) % VOCAB for i in range(600)]], chunk=32)
        try:
            budget = yield next(inner)
            while True:
                n = inner.send(budget)
                ran.append(n)
                if len(ran) == 1:
                    first_step.set()
                    gate.wait(30)
                budget = yield n
        except StopIteration as done:
            return done.value
        finally:
            closed.set()

    async def go() -> None:
        task = asyncio.create_task(backend._on_worker(gated))
        assert await asyncio.to_thread(first_step.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    cancelled0 = engine.stats.cancelled
    asyncio.run(go())
    gate.set()
    assert closed.wait(30)
    assert len(ran) == 1 and engine.stats.cancelled == cancelled0 + 1
    # the same job left alone runs to its end
    (whole,) = engine.run_job(lambda r: score_steps(r, [1, 2], [[(5 * i) % VOCAB for i in range(600)]], chunk=32)).result(60)
    assert len(whole.logprobs) == 600
    idle(engine)
