"""Candidates cut to fit the fuser's or judge's context (components/fit.py): the pure parts, the graph over a real
upstream HTTP server with a counting backend, and the real engine's tokenizer and context."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from archon_server.backends.base import ChatRequest
from archon_server.backends.registry import BackendRegistry, build_registry
from archon_server.components.fit import ELLIPSIS, cap_lengths, cut, fit_texts
from archon_server.graph.runtime import GraphRuntime
from archon_server.spec import parse_architecture
from conftest import fake_config


def test_cap_lengths_keeps_short_texts_whole_and_shares_the_rest():
    assert cap_lengths([10, 20, 30], 100) == 30  # all fit
    assert cap_lengths([10, 100, 100], 110) == 50  # 10 stays, the two long ones share 100
    assert cap_lengths([10, 30, 100], 70) == 30  # 10 and 30 stay, the long one gets the 30 left
    assert cap_lengths([100, 100], 0) == 0
    for lengths, total in (([5, 50, 500, 5000], 1000), ([7] * 6, 20), ([1, 2, 3], 5)):
        c = cap_lengths(lengths, total)
        assert sum(min(n, c) for n in lengths) <= total < sum(min(n, c + 1) for n in lengths)


def test_cut_ends_at_a_word_near_the_limit_and_says_so():
    text = "word " * 100
    out = cut(text, 103)
    assert len(out) <= 103 and out.endswith(ELLIPSIS) and out[: -len(ELLIPSIS)].endswith("word")
    assert cut("short", 10) == "short"
    assert len(cut("x" * 500, 100)) == 100  # no space near the end: cut mid-word


def counting(backend, window: int):
    """The backend told its context and a deterministic token count (4 bytes a token, 5 per message): a stand-in for a
    tokenizer, so the test can say exactly what fits."""
    calls = []

    async def prompt_tokens(request: ChatRequest) -> int:
        calls.append(request)
        return sum(len(str(m["content"]).encode()) // 4 + 5 for m in request.messages)

    async def context_window() -> int:
        return window

    backend.context_window = context_window
    backend.prompt_tokens = prompt_tokens
    return calls


async def test_a_fuser_over_long_candidates_gets_them_cut_to_its_context(upstream_factory):
    long = ["alpha " * 400, "beta " * 40, "gamma " * 800]  # ~600, 50 and ~1200 tokens by the count above
    up = upstream_factory(lambda b: {"text": long[: b["n"]]} if b.get("n", 1) > 1 else None)
    reg = build_registry(fake_config(up.url))
    await reg.start()
    try:
        counts = counting(reg.get("aggregator"), window=1200)
        spec = parse_architecture({"name": "t", "layers": [[{"type": "generator", "model": "default", "samples": 3}],
                                                           [{"type": "fuser", "model": "aggregator", "max_tokens": 200}]]})
        res = await GraphRuntime(reg).run(spec, [{"role": "user", "content": "Which is best?"}])
    finally:
        await reg.close()
    fuse = up.requests[-1].body["messages"]
    assert sum(len(m["content"].encode()) // 4 + 5 for m in fuse) <= 1200 - 200  # the answer's max_tokens left free
    system = fuse[0]["content"]
    assert "beta " * 40 in system  # the short candidate is whole
    assert system.count("alpha") < 400 and system.count("gamma") < 800 and system.count(ELLIPSIS) == 2
    assert 200 < system.count("alpha") and abs(system.count("alpha") * 6 - system.count("gamma") * 6) < 60  # equal shares
    call = res.trace.layers[1].calls[0]
    assert call.purpose == "fuse 3, cut to fit 1200 tokens" and call.status == "ok"
    assert len(counts) <= 4  # the whole prompt, the rest alone, one or two cuts

    # nothing near the limit: sent as it is, without counting
    up2 = upstream_factory(lambda b: {"text": ["a", "b"][: b["n"]]} if b.get("n", 1) > 1 else None)
    reg = build_registry(fake_config(up2.url))
    await reg.start()
    try:
        counts = counting(reg.get("aggregator"), window=1200)
        spec = parse_architecture({"name": "t", "layers": [[{"type": "generator", "model": "default", "samples": 2}],
                                                           [{"type": "fuser", "model": "aggregator"}]]})
        res = await GraphRuntime(reg).run(spec, [{"role": "user", "content": "Q"}])
    finally:
        await reg.close()
    assert not counts and res.trace.layers[1].calls[0].purpose == "fuse 2"


async def test_sequential_self_moa_windows_are_fitted(upstream_factory):
    long = ["alpha " * 400, "gamma " * 800, "delta " * 600]
    up = upstream_factory(lambda b: {"text": long[: b["n"]]} if b.get("n", 1) > 1 else None)
    reg = build_registry(fake_config(up.url))
    await reg.start()
    try:
        counting(reg.get("aggregator"), window=1200)
        spec = parse_architecture({"name": "t", "layers": [[{"type": "generator", "model": "default", "samples": 3}],
                                                           [{"type": "self_moa_seq", "model": "aggregator", "window": 3, "max_tokens": 200}]]})
        res = await GraphRuntime(reg).run(spec, [{"role": "user", "content": "Which is best?"}])
    finally:
        await reg.close()
    assert sum(len(m["content"].encode()) // 4 + 5 for m in up.requests[-1].body["messages"]) <= 1200 - 200
    assert res.trace.layers[1].calls[0].purpose == "window 1, cut to fit 1200 tokens"


async def test_judges_are_fitted_too_and_a_question_that_leaves_no_room_goes_as_it_is(upstream_factory):
    up = upstream_factory()
    reg = build_registry(fake_config(up.url))
    counting(reg.get("judge"), window=1000)
    ctx = SimpleNamespace(registry=reg)
    texts = ["x " * 2000, "y " * 2000]
    build = lambda ts: [{"role": "user", "content": "Rank these:\n" + "\n".join(ts)}]  # noqa: E731
    msgs, note = await fit_texts(ctx, "judge", texts, build, reply_tokens=100)
    assert note == "cut to fit 1000 tokens" and len(msgs[0]["content"].encode()) // 4 + 5 <= 900
    # the rest of the prompt alone leaves under 32 tokens a text: sent as it is (the backend refuses it: a 400)
    huge = lambda ts: [{"role": "user", "content": "q " * 1750 + "\n".join(ts)}]  # noqa: E731
    msgs, note = await fit_texts(ctx, "judge", texts, huge, reply_tokens=100)
    assert note is None and msgs == huge(texts)
    # no context known (any OpenAI-compatible upstream today): untouched
    msgs, note = await fit_texts(SimpleNamespace(registry=build_registry(fake_config(up.url))), "judge", texts, build, 100)
    assert note is None and msgs == build(texts)


@pytest.mark.e2e
async def test_the_embedded_engine_counts_its_prompt_and_candidates_fit_its_context(embedded_backend):
    """The real tokenizer and chat template: the cut prompt is within the context and uses most of it."""
    b = embedded_backend
    assert await b.context_window() == 8192
    reg = BackendRegistry()
    reg.register("smol", b, "smollm2")
    msgs = [{"role": "user", "content": "Hello there"}]
    n = await b.prompt_tokens(ChatRequest("smollm2", msgs))
    assert n == len(b._prompt_ids(msgs)) and 3 < n < 64  # SmolLM2's template adds a default system prompt
    texts = [f"Answer {i}: " + "the quick brown fox jumps over the lazy dog " * 150 for i in range(6)]  # ~1,500 tokens each
    build = lambda ts: [{"role": "system", "content": "Synthesize these:\n" + "\n\n".join(ts)}, {"role": "user", "content": "Q?"}]  # noqa: E731
    msgs, note = await fit_texts(SimpleNamespace(registry=reg), "smol", texts, build, reply_tokens=512)
    got = await b.prompt_tokens(ChatRequest("smollm2", msgs))
    assert note == "cut to fit 8192 tokens" and 0.85 * (8192 - 512) < got <= 8192 - 512
    assert all(f"Answer {i}:" in msgs[0]["content"] for i in range(6))  # every candidate kept its share


async def test_an_upstream_without_tokenize_is_asked_once(upstream_factory):
    """The OpenAI-compatible backend learns the context from vLLM's /tokenize; an upstream without it (a 404 here) is
    not asked again, and nothing is fitted."""
    up = upstream_factory()
    reg = build_registry(fake_config(up.url))
    await reg.start()
    try:
        backend = reg.get("aggregator")
        replica = backend.replicas[0]
        assert await backend.context_window() is None and replica.stats["requests"] == 1
        assert await backend.context_window() is None and await backend.prompt_tokens(ChatRequest("m", [{"role": "user", "content": "x"}])) is None
        assert replica.stats["requests"] == 1 and replica.consecutive_failures == 0  # a 404 is an answer, not a failure
    finally:
        await reg.close()
