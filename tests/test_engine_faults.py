"""The scheduler on a tiny random Llama (seconds, no model download): the inference-mode rule for the
KV cache, and fault injection - a failure inside the engine fails the requests of the failing step and
nothing else, and the engine is back in a known state for the next request of any shape (issue #14)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from archon_server.engine.runner import KVCache, ModelRunner
from archon_server.exceptions import KVCacheFull
from archon_server.engine.scheduler import DoneEvent, Engine, ErrorEvent, FinishEvent, GenParams, TokenEvent

VOCAB = 300


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


class LetterTokenizer:
    """Token i decodes to one letter: every token is text, none is special."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


class Collector:
    """A request's sink: gathers events; ``wait()`` returns once the request is done or failed."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.finished = threading.Event()
        self.started = threading.Event()

    def __call__(self, events: list[Any]) -> None:
        self.events += events
        if any(isinstance(e, TokenEvent) for e in events):
            self.started.set()
        if any(isinstance(e, (DoneEvent, ErrorEvent)) for e in events):
            self.finished.set()

    def wait(self, timeout: float = 120) -> "Collector":
        assert self.finished.wait(timeout), "request never finished"
        return self

    @property
    def error(self) -> BaseException | None:
        return next((e.error for e in self.events if isinstance(e, ErrorEvent)), None)

    def texts(self, n: int = 1) -> list[str]:
        assert self.error is None, self.error
        out = {e.index: e for e in self.events if isinstance(e, FinishEvent)}
        assert sorted(out) == list(range(n)), out
        return [out[i].text for i in range(n)]


@pytest.fixture
def engine(tiny_folder: Path):
    eng = Engine(ModelRunner(tiny_folder, device="cpu", dtype="float32"), LetterTokenizer(), eos_ids=set(), max_batch=4,
                 idle_poll_s=0.05, threads=1)
    eng.start()
    yield eng
    eng.shutdown()


def run(engine: Engine, prompt_len: int, **params: Any) -> Collector:
    sink = Collector()
    engine.submit([(7 * i + 3) % VOCAB for i in range(prompt_len)], GenParams(**{"temperature": 0.0, **params}), sink)
    return sink


def idle(engine: Engine, timeout: float = 10) -> None:
    """Wait until the engine holds nothing and its cache is back to the start size."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        cache = engine.cache
        if not engine.active_sequences and not engine.queued_requests and (cache.slots, cache.capacity) == (engine.initial_slots, engine.initial_capacity):
            assert cache.consistent() and cache.k.is_inference()
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.active_sequences} active, {engine.queued_requests} queued, cache {engine.cache.slots}x{engine.cache.capacity}")


def test_a_cache_grown_by_the_forward_pass_can_be_copied_anywhere(tiny_folder: Path):
    runner = ModelRunner(tiny_folder, device="cpu", dtype="float32")
    cache = runner.new_cache(slots=3, capacity=8)
    runner.forward(torch.arange(40)[None], cache, 0, [0])  # grows inside the forward (inference mode)
    assert cache.capacity >= 40 and cache.k.is_inference()
    cache.copy_slot(0, 2)  # outside inference mode: issue #14's failure
    cache.move_slot(2, 1)
    assert cache.lengths[:3] == [40, 40, 0]
    assert torch.equal(cache.k[:, 1, :, :40], cache.k[:, 0, :, :40])


def test_a_growing_cache_keeps_only_the_slots_in_use(tiny_folder: Path):
    """Every slot is as long as the longest: slots left idle by an earlier wide batch grew with each long prompt (on
    the default server all 8 SmolLM2 slots, 2.6 GB, for an n=2 long prompt beside two rows: 4 in use)."""
    runner = ModelRunner(tiny_folder, device="cpu", dtype="float32")
    cache = runner.new_cache(slots=8, capacity=64)
    for s in range(3):
        runner.forward(torch.arange(10 + s, 40 + 2 * s)[None], cache, s, [0])
    k = cache.k[:, :3].clone()
    cache.reserve(4, 100, in_use=3)  # the capacity grows: a copy anyway, of the 3 in use and the one asked for
    assert (cache.slots, cache.lengths) == (4, [30, 31, 32, 0]) and cache.capacity >= 100
    assert torch.equal(cache.k[:, :3, :, :64], k) and cache.k.is_inference()
    cache.reserve(6, 100, in_use=3)  # more slots at the same capacity: grows as before
    assert cache.slots == 8 and cache.lengths[:3] == [30, 31, 32]
    cache.reserve(2, 300)  # no in_use given: every slot is kept
    assert cache.slots == 8 and torch.equal(cache.k[:, :3, :, :64], k)


def test_a_long_prompt_beside_decoding_rows_grows_their_slots_only(tiny_folder: Path):
    engine = Engine(ModelRunner(tiny_folder, device="cpu", dtype="float32"), LetterTokenizer(), eos_ids=set(), max_batch=8,
                    idle_poll_s=0.05, threads=1, prefix_cache_mb=0)
    engine.start()
    try:
        rows_alone = [logprobs(run(engine, 20 + i, max_tokens=400, logprobs=True).wait()) for i in range(2)]
        long_alone = run(engine, 1500, max_tokens=5, n=2, logprobs=True).wait()
        idle(engine)
        assert engine.cache.slots == 8
        rows = [run(engine, 20 + i, max_tokens=400, logprobs=True) for i in range(2)]
        assert all(r.started.wait(60) for r in rows)
        seen: dict[str, Any] = {}

        class Watch(Collector):
            def __call__(self, events: list[Any]) -> None:  # in the engine's worker: the cache as the step left it
                if "slots" not in seen and any(isinstance(e, TokenEvent) for e in events):
                    seen.update(slots=engine.cache.slots, capacity=engine.cache.capacity,
                                rows_running=not any(r.finished.is_set() for r in rows))
                super().__call__(events)

        long = Watch()
        engine.submit([(7 * i + 3) % VOCAB for i in range(1500)], GenParams(temperature=0.0, max_tokens=5, n=2, logprobs=True), long)
        long.wait()
        assert seen["rows_running"] and seen["capacity"] >= 1501
        assert seen["slots"] == 4  # two rows and the long prompt's two samples; 8 before
        assert long.texts(2) == long_alone.texts(2) and logprobs(long) == logprobs(long_alone)
        for r, alone in zip(rows, rows_alone):  # (batched beside the long prompt's rows: float32 sums in another order)
            assert r.wait().texts() and len(logprobs(r)) == len(alone) == 400
            assert max(abs(a - b) for a, b in zip(logprobs(r), alone)) < 1e-4
        idle(engine)
    finally:
        engine.shutdown()


def test_n_samples_after_the_cache_grew_while_decoding(engine: Engine):
    assert engine.cache.capacity == 512
    long = run(engine, 500, max_tokens=40).wait()  # 540 positions: the cache grows during decode steps
    assert len(long.texts()[0]) == 40
    three = run(engine, 20, max_tokens=10, n=3, temperature=1.0, seed=1).wait()
    assert [len(t) for t in three.texts(3)] == [10] * 3
    assert engine.stats.errors == 0
    idle(engine)  # ... and the grown cache is given back once idle


def test_a_failed_decode_step_fails_its_batch_only(engine: Engine, monkeypatch: pytest.MonkeyPatch):
    alone = run(engine, 30, max_tokens=20).wait().texts()[0]
    calls = {"n": 0}
    decode = engine.runner.decode

    def flaky(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected decode failure")
        return decode(*a, **kw)

    monkeypatch.setattr(engine.runner, "decode", flaky)
    wide = run(engine, 30, max_tokens=20, n=4)  # fills max_batch: the next request waits in the queue
    queued = run(engine, 30, max_tokens=20)
    assert "injected" in str(wide.wait().error)
    assert queued.wait().texts() == [alone]  # queued behind the failure, served as if nothing happened
    # The next request of any shape works: wider than max_batch, past the cache's capacity, sampled.
    big = run(engine, 600, max_tokens=8, n=6, temperature=1.0, seed=2).wait()
    assert [len(t) for t in big.texts(6)] == [8] * 6
    assert engine.stats.errors == 1
    idle(engine)


def test_a_failed_prefill_fails_that_request_while_the_batch_streams_on(engine: Engine, monkeypatch: pytest.MonkeyPatch):
    alone = run(engine, 25, max_tokens=60).wait().texts()[0]
    streaming = run(engine, 25, max_tokens=60)
    assert streaming.started.wait(60)
    forward = engine.runner.forward

    def no_prefill(tokens: torch.Tensor, *a: Any, **kw: Any) -> Any:
        if tokens.shape[1] > 1:
            raise RuntimeError("injected prefill failure")
        return forward(tokens, *a, **kw)

    monkeypatch.setattr(engine.runner, "forward", no_prefill)
    doomed = run(engine, 40, max_tokens=5, n=2)
    assert "injected" in str(doomed.wait().error)
    assert streaming.wait().texts() == [alone]
    monkeypatch.setattr(engine.runner, "forward", forward)
    assert len(run(engine, 40, max_tokens=5, n=2).wait().texts(2)) == 2
    idle(engine)


def test_a_cache_that_cannot_grow_fails_that_request_only(engine: Engine, monkeypatch: pytest.MonkeyPatch):
    reserve = KVCache.reserve

    def capped(self: KVCache, slots: int, capacity: int, in_use: int | None = None) -> None:
        if capacity > 1000:
            raise MemoryError("injected: no memory for a bigger cache")
        reserve(self, slots, capacity, in_use)

    monkeypatch.setattr(KVCache, "reserve", capped)
    too_big = run(engine, 1200, max_tokens=4)
    small = run(engine, 30, max_tokens=4, n=2)
    assert "injected" in str(too_big.wait().error)
    assert len(small.wait().texts(2)) == 2
    idle(engine)


def logprobs(c: Collector) -> list[float]:
    """The chosen tokens' log-probabilities: they move with any change of the K/V a row reads (a tiny random model's
    greedy text often does not)."""
    return [lp.logprob for e in c.events if isinstance(e, TokenEvent) and e.logprobs for lp in e.logprobs]


def test_a_short_prompt_is_prefilled_ahead_of_a_long_staged_one(tiny_folder: Path):
    """One staged prompt at a time made every request wait for a long prompt's whole prefill (on the default server
    a 16-token answer took 22.5 s behind a 6,800-token prompt, 0.4 s alone). A prompt that fits in one chunk now goes
    first: the long one's partial K/V moves up and waits (set aside). Same greedy outputs as alone, the short one done
    before the long one's first token, rows decoding meanwhile and finishing (compaction moves the set-aside K/V down)."""
    # No prefix cache: the runs alone would otherwise leave the long prompt cached, with nothing left to prefill.
    engine = Engine(ModelRunner(tiny_folder, device="cpu", dtype="float32"), LetterTokenizer(), eos_ids=set(), max_batch=4,
                    idle_poll_s=0.05, threads=1, prefix_cache_mb=0)
    engine.start()
    try:
        _overtaken(engine)
    finally:
        engine.shutdown()


def _overtaken(engine: Engine) -> None:
    alone = run(engine, 1800, max_tokens=6, logprobs=True).wait()
    alone_long = alone.texts()[0]
    alone_short = run(engine, 20, max_tokens=6, n=2).wait().texts(2)
    alone_busy = run(engine, 40, max_tokens=3).wait().texts()[0]
    before = engine.stats.overtakes
    busy = run(engine, 40, max_tokens=3)  # decodes while the long prompt prefills, ends while it is set aside or after
    assert busy.started.wait(30)
    long = run(engine, 1800, max_tokens=6, logprobs=True)
    short = run(engine, 20, max_tokens=6, n=2)
    short.wait()
    assert not long.started.is_set()  # the short one did not wait for the long prefill
    assert short.texts(2) == alone_short and long.wait().texts() == [alone_long] and busy.wait().texts() == [alone_busy]
    assert logprobs(long) == pytest.approx(logprobs(alone), abs=1e-3) and len(logprobs(long)) == 6
    assert engine.stats.overtakes == before + 1 and engine.stats.errors == 0
    idle(engine)


def test_a_short_prompt_cancelled_while_ahead_of_a_long_one_leaves_it_whole(tiny_folder: Path, monkeypatch: pytest.MonkeyPatch):
    """The short prompt is cancelled while staged ahead (its client left): the long one set aside is staged again
    just past the rows and finishes as it would alone."""
    engine = Engine(ModelRunner(tiny_folder, device="cpu", dtype="float32"), LetterTokenizer(), eos_ids=set(), max_batch=4,
                    idle_poll_s=0.05, threads=1, prefix_cache_mb=0)
    engine.start()
    try:
        alone = run(engine, 1800, max_tokens=6, logprobs=True).wait()
        start = engine._start

        def start_then_cancel(req: Any, speculative: bool) -> None:
            start(req, speculative)
            if len(req.prompt) == 20:  # the short one: cancelled before its prefill runs
                req.cancelled = True

        monkeypatch.setattr(engine, "_start", start_then_cancel)
        busy = run(engine, 40, max_tokens=200)  # rows below: the set-aside prompt must come back to len(rows), not stay up
        assert busy.started.wait(30)
        long = run(engine, 1800, max_tokens=6, logprobs=True)
        run(engine, 20, max_tokens=6)
        assert long.wait().texts() == alone.texts() and engine.stats.overtakes == 1 and engine.stats.cancelled == 1
        assert logprobs(long) == pytest.approx(logprobs(alone), abs=1e-3) and len(logprobs(long)) == 6
        busy.wait()
        idle(engine)
    finally:
        engine.shutdown()


def test_a_short_prompt_queued_behind_a_second_long_one_goes_ahead_of_both(tiny_folder: Path):
    """Only the head of the queue could overtake: a short request queued behind a second long prompt waited for both
    prefills. Now the first short one in the queue goes ahead of the staged prompt (and so of the queued one too);
    both long prompts then come out as they do alone."""
    engine = Engine(ModelRunner(tiny_folder, device="cpu", dtype="float32"), LetterTokenizer(), eos_ids=set(), max_batch=4,
                    idle_poll_s=0.05, threads=1, prefix_cache_mb=0)
    engine.start()
    try:
        alone = [run(engine, n, max_tokens=6, logprobs=True).wait() for n in (1800, 1700)]
        alone_short = run(engine, 20, max_tokens=6, n=2).wait().texts(2)
        first, second = (run(engine, n, max_tokens=6, logprobs=True) for n in (1800, 1700))
        short = run(engine, 20, max_tokens=6, n=2)
        assert short.wait().texts(2) == alone_short
        assert not first.started.is_set() and not second.started.is_set()
        for got, want in zip((first, second), alone):
            assert got.wait().texts() == want.texts()
            assert logprobs(got) == pytest.approx(logprobs(want), abs=1e-3) and len(logprobs(got)) == 6
        assert engine.stats.overtakes == 1 and engine.stats.errors == 0
        idle(engine)
    finally:
        engine.shutdown()


def test_a_chat_turn_whose_earlier_turns_are_cached_goes_ahead_of_a_long_prompt(tiny_folder: Path):
    """Overtaking judged a prompt by its whole length: a chat's next turn, its earlier turns in the prefix cache and
    a few dozen tokens new, waited behind a long prompt's whole prefill. Its uncached part is what counts."""
    engine = Engine(ModelRunner(tiny_folder, device="cpu", dtype="float32"), LetterTokenizer(), eos_ids=set(), max_batch=4,
                    idle_poll_s=0.05, threads=1)
    engine.start()

    def submit(prompt: list[int]) -> Collector:
        sink = Collector()
        engine.submit(prompt, GenParams(temperature=0.0, max_tokens=6, logprobs=True), sink)
        return sink

    try:
        earlier = [(5 * i + 1) % VOCAB for i in range(600)]  # the conversation so far (its prompt cached once served)
        turn = earlier + [(11 * i + 2) % VOCAB for i in range(40)]
        document = [(13 * i + 4) % VOCAB for i in range(1800)]
        alone = submit(turn).wait()  # caches the turn's own prefix too: clear it, keep the earlier turns only
        engine.prefix.clear()
        submit(earlier).wait()
        assert engine.prefix.cached_tokens(turn) == 576 and engine.prefix.cached_tokens(document) == 0
        before = engine.stats.overtakes
        # Both queued while the worker waits (a job holding it): the long prompt is staged first, however fast this
        # host prefills it (on the AMX Xeon its whole 1,800 tokens took less than the 50 ms this test used to sleep).
        gate = threading.Event()
        engine.run_job(lambda runner: gate.wait(30))
        long = submit(document)
        queued = submit(turn)
        gate.set()
        chat = queued.wait()
        assert not long.started.is_set()  # the turn did not wait for the long prefill
        assert chat.texts() == alone.texts() and logprobs(chat) == pytest.approx(logprobs(alone), abs=1e-4)
        assert long.wait().texts() and engine.stats.overtakes == before + 1 and engine.stats.errors == 0
        idle(engine)
    finally:
        engine.shutdown()


def test_rows_sharing_a_prompt_read_it_once_and_get_the_same_logits(tiny_folder: Path):
    """A decode step where groups of rows share their prompt's K/V (the n samples of one prompt) attends to each
    group's prompt once and merges with each row's own tail by log-sum-exp: in float32 the logits equal the plain
    path's, with rows of other requests between and after the groups and rows at different lengths."""
    runner = ModelRunner(tiny_folder, device="cpu", dtype="float32")
    cache = runner.new_cache(slots=6, capacity=64)
    prompts = {0: list(range(3, 43)), 3: list(range(50, 67)), 4: list(range(100, 130))}  # slot -> prompt
    for slot, ids in prompts.items():
        runner.forward(torch.tensor([ids]), cache, slot, [0], small_weights=False)
    for src, dst in ((0, 1), (0, 2), (4, 5)):
        cache.copy_slot(src, dst)
    runner.decode([7], cache, first_slot=1)  # one row of a group a token ahead of the others
    groups = [(0, 3, 40), (4, 2, 30)]
    calls = []
    attend = runner._attend_shared
    runner._attend_shared = lambda *a: calls.append(1) or attend(*a)  # type: ignore[method-assign]
    for step in range(3):
        lengths = list(cache.lengths[:6])
        tokens = [11 + step, 12, 13, 14, 15 + step, 16]
        plain = runner.decode(tokens, cache, 0).logits
        cache.lengths[:6] = lengths  # the same step again (it writes the same K/V)
        together = runner.decode(tokens, cache, 0, shared=groups).logits
        assert (plain - together).abs().max().item() < 1e-4, step
    assert len(calls) == 3 * runner.dims.layers  # (the plain steps did not take it)
    runner.shared_attention = False  # a torch without the flash op that returns the log-sum-exp: the plain path
    runner.decode([1, 2, 3, 4, 5, 6], cache, 0, shared=groups)
    assert len(calls) == 3 * runner.dims.layers


def test_samples_of_a_long_prompt_decode_as_one_does_alone(tiny_folder: Path):
    """Through the engine: the n rows of a request over a long prompt read its K/V once a step (shared_prompt_min
    lowered for the tiny model); greedy samples equal the same prompt decoded alone, token log-probs included."""
    engine = Engine(ModelRunner(tiny_folder, device="cpu", dtype="float32"), LetterTokenizer(), eos_ids=set(), max_batch=6,
                    idle_poll_s=0.05, threads=1, prefix_cache_mb=0)
    engine.shared_prompt_min = 64
    seen: list[Any] = []
    decode = engine.runner.decode
    engine.runner.decode = lambda tokens, cache, first=0, shared=None: seen.append(shared) or decode(tokens, cache, first, shared)  # type: ignore[method-assign]
    engine.start()
    try:
        alone = run(engine, 700, max_tokens=8, logprobs=True).wait()
        other = run(engine, 90, max_tokens=12)  # another request's row in the same steps
        three = run(engine, 700, max_tokens=8, n=3, logprobs=True).wait()
        assert three.texts(3) == alone.texts() * 3 and other.wait().error is None
        per_row = {i: [lp.logprob for e in three.events if isinstance(e, TokenEvent) and e.index == i and e.logprobs
                       for lp in e.logprobs] for i in range(3)}
        for i in range(3):
            assert per_row[i] == pytest.approx(logprobs(alone), abs=1e-3)
        # the three rows did read their prompt once a step, as one group wherever the other request's row was
        assert [(0, 3, 700)] in seen or [(1, 3, 700)] in seen, seen
        idle(engine)
    finally:
        engine.shutdown()


# -- the KV cache's memory budget (kv_cache_mb) ------------------------------------------------------------------------
# The tiny model's K/V: 2 layers x 2 heads x 16 dims x K and V x 4 bytes = 512 bytes a position of a slot, so a budget
# of 1 MB holds 2,048 positions (2 slots of 1,024); the model's context is 2,048.


def test_a_cache_grows_within_its_budget_or_not_at_all(tiny_folder: Path):
    runner = ModelRunner(tiny_folder, device="cpu", dtype="float32")
    cache = runner.new_cache(slots=2, capacity=512, budget=512 * 1400)
    assert cache.bytes_for(1, 1) == 512
    for s in range(2):
        runner.forward(torch.arange(10 + s, 40 + 2 * s)[None], cache, s, [0])
    k = cache.k[:, :2, :, :32].clone()
    cache.reserve(2, 600)  # doubling (2 x 1,024) is past the budget: the most it allows, on the 64-position grid
    assert (cache.slots, cache.capacity, cache.lengths) == (2, 640, [30, 31]) and torch.equal(cache.k[:, :2, :, :32], k)
    with pytest.raises(KVCacheFull, match="3 sequence slot"):
        cache.reserve(3, 600)  # a third slot of 640 positions: 960 KB of a 700 KB budget
    with pytest.raises(KVCacheFull):
        cache.reserve(2, 800)
    assert (cache.slots, cache.capacity, cache.lengths) == (2, 640, [30, 31]) and torch.equal(cache.k[:, :2, :, :32], k)
    cache.reserve(1, 1300, in_use=1)  # the second slot is idle: one slot of 1,344 positions fits
    assert (cache.slots, cache.capacity, cache.lengths) == (1, 1344, [30]) and torch.equal(cache.k[:, :1, :, :32], k[:, :1])
    cache.lengths[0] = 1300  # a finished row's length, left in its slot
    cache.reserve(2, 600, in_use=0)  # nothing in use: two slots of 640 fit (the stale length would need 1,344 each)
    assert (cache.slots, cache.capacity, cache.lengths) == (2, 640, [0, 0]) and cache.consistent()


def kv_engine(tiny_folder: Path) -> Engine:
    engine = Engine(ModelRunner(tiny_folder, device="cpu", dtype="float32"), LetterTokenizer(), eos_ids=set(), max_batch=8,
                    idle_poll_s=0.05, threads=1, prefix_cache_mb=0, kv_cache_mb=1)
    engine.start()
    return engine


def finish(c: Collector) -> FinishEvent:
    return next(e for e in c.events if isinstance(e, FinishEvent))


def test_a_request_that_cannot_fit_the_kv_budget_alone_is_refused_and_one_that_can_waits_for_room(tiny_folder: Path):
    """Why a budget: on Linux a cache too big for the machine is not refused by the allocator; the kernel kills the
    server (every request in it) once the pages are touched."""
    engine = kv_engine(tiny_folder)
    try:
        assert engine.kv_budget == 2**20
        with pytest.raises(KVCacheFull, match=r"n=2 sequences of a 1,100-token prompt .* kv_cache_mb") as refused:
            run(engine, 1100, n=2, max_tokens=3)
        assert isinstance(refused.value, ValueError)  # a 400 at the API
        alone = run(engine, 1100, max_tokens=3, logprobs=True).wait()
        row = run(engine, 20, max_tokens=300)
        assert row.started.wait(60)
        long = run(engine, 1100, max_tokens=3, logprobs=True)  # 2 slots x 1,152 positions: past the budget beside the row
        long.wait()
        assert row.finished.is_set()  # it waited for the row (FIFO: nothing queued behind it went first)
        assert len(row.wait().texts()[0]) == 300 and logprobs(long) == logprobs(alone)
        assert engine.stats.kv_waits == 1 and engine.stats.errors == 0
        idle(engine)
    finally:
        engine.shutdown()


def test_rows_that_reach_the_end_of_a_full_kv_cache_end_with_length_and_the_others_go_on(tiny_folder: Path):
    engine = kv_engine(tiny_folder)
    try:
        alone = logprobs(run(engine, 20, max_tokens=1200, logprobs=True).wait())
        idle(engine)
        a, b = run(engine, 20, max_tokens=1200, logprobs=True), run(engine, 30, max_tokens=1200)
        # Both fit 1,024 positions (2 x 1,024: the budget); b, the longer, reaches the end first: the cache cannot grow
        # for two, b ends there with `length`, and a alone grows to 1,220.
        assert finish(b.wait()).reason == "length" and finish(b).completion_tokens == 1024 - 30 + 1
        assert finish(a.wait()).reason == "length" and finish(a).completion_tokens == 1200
        assert max(abs(x - y) for x, y in zip(logprobs(a), alone)) < 1e-4 and len(logprobs(a)) == 1200
        assert engine.stats.kv_cuts == 1 and engine.stats.errors == 0
        idle(engine)
    finally:
        engine.shutdown()


def test_a_staged_prompt_gives_way_to_a_row_that_must_grow(tiny_folder: Path, monkeypatch: pytest.MonkeyPatch):
    """A long prompt admitted beside a row (2 x 1,024 positions fit) is still staged when the row reaches 1,024: the
    prompt, not decoding yet, goes back to the queue and waits; the row grows and ends whole (it had been cut)."""
    engine = kv_engine(tiny_folder)
    try:
        row_alone = logprobs(run(engine, 20, max_tokens=1500, logprobs=True).wait())
        long_alone = logprobs(run(engine, 900, max_tokens=3, logprobs=True).wait())
        idle(engine)
        due = engine._prefill_due  # the staged prompt's chunks are held until it has given way (the row's pace decides)
        monkeypatch.setattr(engine, "_prefill_due", lambda: due() if engine.stats.kv_waits or not engine._rows else False)
        row = run(engine, 20, max_tokens=1500, logprobs=True)
        assert row.started.wait(60)
        long = run(engine, 900, max_tokens=3, logprobs=True)
        long.wait()
        assert row.finished.is_set() and finish(row.wait()).completion_tokens == 1500
        assert logprobs(long) == long_alone and max(abs(a - b) for a, b in zip(logprobs(row), row_alone)) < 1e-4
        assert (engine.stats.kv_waits, engine.stats.kv_cuts, engine.stats.requests, engine.stats.errors) == (1, 0, 4, 0)
        idle(engine)
    finally:
        engine.shutdown()
