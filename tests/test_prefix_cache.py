"""Prefix caching across requests (engine/prefix_cache.py): unit rules on a tiny cache, then the real
SmolLM2 engine: the same output with the cache on and off (greedy and seeded), eviction under a small
budget, and nothing kept from a request cancelled in the middle of its prompt."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from archon_server.backends.base import ChatRequest, SamplingParams
from archon_server.backends.local import LocalBackend
from archon_server.engine.prefix_cache import PrefixCache
from archon_server.engine.runner import KVCache, LlamaDims
from archon_server.engine.types import GenParams

DIMS = LlamaDims(vocab=10, hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, rms_eps=1e-5,
                 rope_theta=1e4, max_positions=256, tie_embeddings=True)
BLOCK_BYTES = 2 * DIMS.layers * DIMS.kv_heads * 4 * DIMS.head_dim * 4  # k+v, block of 4 tokens, float32


def filled(prompt: list[int], slot: int = 0) -> KVCache:
    """A cache whose K/V at position p encodes (token, p): what a prefill of ``prompt`` would leave there."""
    cache = KVCache(DIMS, torch.float32, torch.device("cpu"), slots=2, capacity=64)
    with torch.inference_mode():
        for p, t in enumerate(prompt):
            cache.k[:, slot, :, p] = t * 1000 + p
            cache.v[:, slot, :, p] = -(t * 1000 + p)
    cache.lengths[slot] = len(prompt)
    return cache


def test_reuses_whole_blocks_of_an_exact_prefix_and_leaves_the_last_token():
    pc = PrefixCache(budget_bytes=10 * BLOCK_BYTES, block=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    pc.store(a, filled(a), 0)
    assert len(pc) == 2  # two whole blocks; the partial one is not kept
    target = KVCache(DIMS, torch.float32, torch.device("cpu"), slots=2, capacity=64)
    assert pc.load([1, 2, 3, 4, 5, 6, 7, 8, 0, 0], target, 1) == 8
    assert torch.equal(target.k[:, 1, :, :8], filled(a).k[:, 0, :, :8]) and target.lengths[1] == 8
    assert pc.load([1, 2, 3, 4, 5, 6, 7, 8], target, 1) == 4  # the last token is always computed
    assert pc.load([1, 2, 3, 9, 5, 6, 7, 8, 0], target, 1) == 0  # one token differs in the first block
    assert pc.load([9, 1, 2, 3, 4, 5, 6, 7, 8], target, 1) == 0  # same tokens, other positions
    assert pc.stats.hit_tokens == 12 and pc.stats.queries == 4


def test_a_block_is_keyed_by_everything_before_it():
    pc = PrefixCache(budget_bytes=10 * BLOCK_BYTES, block=4)
    a = [1, 1, 1, 1, 5, 6, 7, 8, 0]
    pc.store(a, filled(a), 0)
    # the second block's tokens alone are not enough: its parent differs
    assert pc.load([2, 2, 2, 2, 5, 6, 7, 8, 0], KVCache(DIMS, torch.float32, torch.device("cpu"), 1, 16), 0) == 0


def test_blocks_are_copies_not_views_of_the_slot():
    pc = PrefixCache(budget_bytes=10 * BLOCK_BYTES, block=4)
    a = [1, 2, 3, 4, 5]
    cache = filled(a)
    pc.store(a, cache, 0)
    with torch.inference_mode():
        cache.k.zero_()  # the slot is reused by another request
    target = KVCache(DIMS, torch.float32, torch.device("cpu"), slots=1, capacity=16)
    assert pc.load(a, target, 0) == 4
    assert target.k[0, 0, 0, 3, 0].item() == 4 * 1000 + 3


def test_eviction_keeps_the_budget_and_takes_leaves_first():
    pc = PrefixCache(budget_bytes=3 * BLOCK_BYTES, block=4)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0]
    pc.store(a, filled(a), 0)  # three blocks: the budget
    assert len(pc) == 3 and pc.stats.bytes == 3 * BLOCK_BYTES
    b = [1, 2, 3, 4, 20, 21, 22, 23, 0]  # shares the root block, adds one
    pc.store(b, filled(b), 0)
    assert pc.stats.bytes <= 3 * BLOCK_BYTES and pc.stats.evicted_blocks == 1
    probe = KVCache(DIMS, torch.float32, torch.device("cpu"), 1, 32)
    assert pc.load(b, probe, 0) == 8  # the new chain is whole
    assert pc.load(a, probe, 0) == 8  # a's deepest block went, its parents stayed
    assert pc.stats.blocks == 3


def test_disabled_cache_keeps_nothing():
    pc = PrefixCache(budget_bytes=0)
    a = list(range(100))
    pc.store(a, filled(a[:60]), 0)
    assert len(pc) == 0 and pc.load(a, filled(a[:60]), 1) == 0 and pc.stats.queries == 0


# --------------------------------------------------------------------------- the real engine

SYSTEM = "You are a careful assistant who answers in plain words. " * 24  # ~300 tokens shared by every prompt


@pytest.fixture(scope="module")
def backend(embedded_backend):
    return embedded_backend


def ask(b: LocalBackend, question: str, **params) -> list[str]:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    res = asyncio.run(b.chat(ChatRequest("m", msgs, SamplingParams(**params))))
    return [c.text for c in res.choices]


def set_budget(b: LocalBackend, mb: float) -> None:
    b.engine.prefix.clear()
    b.engine.prefix.budget_bytes = int(mb * 2**20)


GREEDY = {"max_tokens": 24, "temperature": 0.0}
SEEDED = {"max_tokens": 16, "temperature": 0.9, "seed": 11, "n": 3}


@pytest.mark.e2e
def test_a_prompts_kv_does_not_depend_on_its_length_or_chunking(backend):
    """The K/V (and next-token logits) of a prefix are the same bits whether the prefix is the whole prompt,
    the start of a longer one, or prefilled in other chunks (whole blocks, as the engine cuts them): what
    makes a cache hit exact."""
    r = backend.engine.runner
    ids = backend._prompt_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Why is the sky blue?"}])
    n = len(ids)
    cache = r.new_cache(3, n + 64)
    whole = r.forward(torch.tensor([ids]), cache, 0, [0], small_weights=False, kv_grid=32)
    r.forward(torch.tensor([ids[:256] + [7] * 40]), cache, 1, [0], small_weights=False, kv_grid=32)  # a longer other prompt
    tail = r.forward(torch.tensor([ids[256:]]), cache, 1, [256], small_weights=False, kv_grid=32)  # ... its 256 reused
    for i in range(0, n, 64):
        odd = r.forward(torch.tensor([ids[i : i + 64]]), cache, 2, [i], small_weights=False, kv_grid=32)
    for slot in (1, 2):
        assert torch.equal(cache.k[:, 0, :, :n], cache.k[:, slot, :, :n])
        assert torch.equal(cache.v[:, 0, :, :n], cache.v[:, slot, :, :n])
    assert torch.equal(whole.logits, tail.logits) and torch.equal(whole.logits, odd.logits)


@pytest.mark.e2e
def test_same_output_with_the_cache_on_and_off(backend):
    """Bit for bit: a system prompt computed inside another question's prompt, and a prompt's own blocks."""
    prompts = [("Name three fruits.", GREEDY), ("Name three fruits.", SEEDED), ("Why is the sky blue?", GREEDY)]
    set_budget(backend, 0)
    off = [ask(backend, q, **p) for q, p in prompts]
    set_budget(backend, 256)
    ask(backend, "Name three colours.", max_tokens=2)  # fills the cache with the shared system prompt
    before = backend.stats()["prefix_hit_tokens"]
    first = [ask(backend, q, **p) for q, p in prompts]
    again = [ask(backend, q, **p) for q, p in prompts]
    st = backend.stats()
    assert st["prefix_hit_tokens"] - before >= 6 * 256  # every prompt reused (at least) the system prompt
    assert 0 < st["prefix_hit_rate"] <= 1
    assert first == off and again == off


@pytest.mark.e2e
def test_eviction_under_a_small_budget_keeps_outputs_right(backend):
    # each question adds a few blocks of its own after the shared system prompt
    questions = [f"{topic} " * 120 + f"Name a {topic.lower()}." for topic in ("River", "Mountain", "City", "Planet")]
    set_budget(backend, 0)
    off = [ask(backend, q, **GREEDY) for q in questions]
    cache = backend.engine.cache
    kv_per_token = 2 * cache.k[:, 0, :, 0].numel() * cache.k.element_size()
    budget_tokens = 480  # room for one prompt's blocks and a few more
    set_budget(backend, budget_tokens * kv_per_token / 2**20)
    on = [ask(backend, q, **GREEDY) for q in questions + questions]
    st = backend.stats()
    assert st["prefix_evicted_blocks"] > 0
    assert st["prefix_bytes"] <= backend.engine.prefix.budget_bytes
    assert on == off + off


@pytest.mark.e2e
def test_a_request_cancelled_mid_prompt_leaves_no_blocks(backend):
    engine = backend.engine
    set_budget(backend, 0)
    question = "Tell me about the history of bread, from the first grains to modern bakeries."
    off = ask(backend, question, **GREEDY)
    set_budget(backend, 256)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    prompt = backend._prompt_ids(msgs)
    inserted = engine.prefix.stats.inserted_blocks
    chunk, engine.prefill_chunk_idle = engine.prefill_chunk_idle, 32  # one block: the prompt now takes ~10 passes
    try:
        handle = engine.submit(prompt, GenParams(max_tokens=8, temperature=0.0), lambda events: None)
        deadline = time.monotonic() + 60
        while not (engine._prefilling is not None and engine._prefilling.done >= 64) and time.monotonic() < deadline:
            time.sleep(0.001)
        handle.cancel()
        while not handle.done and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.prefill_chunk_idle = chunk
    assert handle.done
    assert len(engine.prefix) == 0 and engine.prefix.stats.inserted_blocks == inserted
    # Its slot is reused by another prompt, then the same prompt again: both right.
    assert ask(backend, "Name three fruits.", max_tokens=4, temperature=0.0)
    assert ask(backend, question, **GREEDY) == off
