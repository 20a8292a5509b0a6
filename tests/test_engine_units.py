"""Pure parts of the engine: stop strings, incremental detokenization, sampling filters."""

from __future__ import annotations

import random

import pytest
import torch

from archon_server.engine.detokenize import IncrementalText, find_stop, stop_holdback
from archon_server.engine.runner import attend_by_products, attend_by_products_lse, pack_for_decode, row_exact_linear
from archon_server.engine.sampling import RowSampling, choice_seed, draw, filter_logits, make_generator, sample_rows


class CharTokenizer:
    """Token i = chr(i); ids >= 1000 are 'special' (dropped when skipping special tokens)."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i >= 1000))


def feed(text: str, stops: list[str]) -> tuple[IncrementalText, list[str]]:
    it = IncrementalText(CharTokenizer(), stops)
    pieces = []
    for ch in text:
        stopped = it.add(ord(ch))
        pieces.append(it.take(final=stopped))
        if stopped:
            break
    else:
        it.flush()
        pieces.append(it.take(final=True))
    return it, pieces


class ByteTokenizer:
    """Token i = byte i (UTF-8), decoded with replacement characters as a byte-level BPE tokenizer does."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_a_character_cut_by_the_length_limit_is_dropped_not_replaced():
    it = IncrementalText(ByteTokenizer())
    for b in "ok 🌍".encode()[:-1]:  # the emoji's last byte never comes
        it.add(b)
    it.flush()
    assert it.text == "ok " and it.take(final=True) == "ok "
    whole = IncrementalText(ByteTokenizer())
    for b in "ok 🌍!".encode():
        whole.add(b)
    whole.flush()
    assert whole.text == "ok 🌍!"


def test_stop_holdback_and_find():
    assert stop_holdback("hello wor", ["world"]) == 3
    assert stop_holdback("hello", ["world"]) == 0
    assert stop_holdback("ab\n", ["\n\n", "x"]) == 1
    assert find_stop("a STOP b STOP", ["STOP"]) == 2
    assert find_stop("abc", ["zz"]) == -1


def test_stop_string_spanning_tokens_never_leaks_into_stream():
    it, pieces = feed("one two\n\nthree", ["\n\n"])
    assert it.stopped and it.text == "one two"
    assert "".join(pieces) == "one two"
    assert all("\n" not in p for p in pieces)


def test_no_stop_streams_everything():
    it, pieces = feed("abc def", ["zzz"])
    assert not it.stopped and "".join(pieces) == "abc def" == it.text


def test_earliest_of_several_stops_wins():
    it, _ = feed("xx END yy STOP", ["STOP", "END"])
    assert it.text == "xx "


def test_top_k_and_top_p_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert torch.isinf(filter_logits(logits, 1.0, 1.0, 2)).tolist() == [False, False, True, True]
    probs = logits.softmax(-1)  # ~[0.64, 0.24, 0.09, 0.03]
    kept = ~torch.isinf(filter_logits(logits, 1.0, 0.7, None))
    assert kept.tolist() == [True, True, False, False]
    assert probs[0] < 0.7 < probs[0] + probs[1]
    # top_p smaller than the best token still keeps one token
    assert (~torch.isinf(filter_logits(logits, 1.0, 0.01, None))).sum() == 1


def test_min_p_keeps_tokens_within_its_share_of_the_best_after_temperature():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])  # probabilities ~0.64, 0.24, 0.09, 0.03
    kept = lambda t, m: (~torch.isinf(filter_logits(logits, t, 1.0, None, m))).tolist()  # noqa: E731
    assert kept(1.0, 0.3) == [True, True, False, False]  # 0.24 / 0.64 = 0.37 >= 0.3; 0.09 / 0.64 = 0.14 < 0.3
    assert kept(1.0, 0.1) == [True, True, True, False]
    # temperature first, as vLLM: at 3 the ratios to the best are e^-1/3, e^-2/3, e^-1 (0.72, 0.51, 0.37)
    assert kept(1.0, 0.4) == [True, False, False, False] and kept(3.0, 0.4) == [True, True, True, False]
    assert kept(1.0, 1.0) == [True, False, False, False] and kept(1.0, 0.0) == [True] * 4


def test_min_tokens_holds_eos_back_until_the_count_then_lets_it_be_drawn():
    """vLLM's min_tokens: while a row has fewer tokens than that, its EOS ids are not drawn, greedy or sampled."""
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0]] * 2)  # token 1 (EOS here) is by far the most likely
    out: list[int] = []
    rows = [RowSampling(temperature=0.0, output_ids=out, min_tokens=2, held_ids=torch.tensor([1])),
            RowSampling(temperature=1.0, generator=make_generator(1, torch.device("cpu")), output_ids=out, min_tokens=2,
                        held_ids=torch.tensor([1]))]
    for _ in range(20):
        assert 1 not in sample_rows(logits, rows)
    out += [2, 2]
    assert sample_rows(logits, rows)[0] == 1

    class OnlyEnd:  # a grammar whose answer is complete: nothing but EOS may follow
        def mask(self, row: torch.Tensor) -> torch.Tensor:
            return torch.full_like(row, float("-inf")).index_fill(0, torch.tensor([1]), 0.0)

        def accept(self, token: int) -> None:
            pass

    ended = RowSampling(temperature=0.0, output_ids=[], min_tokens=5, held_ids=torch.tensor([1]), constraint=OnlyEnd())
    assert sample_rows(logits[:1], [ended]) == [1]  # the grammar wins over min_tokens


def test_min_tokens_counts_stop_strings_only_past_it():
    """vLLM's rule: a stop string wholly inside the first min_tokens tokens' text does not end the sequence; the
    first one after it does (and the stream still never shows it)."""
    it = IncrementalText(CharTokenizer(), [","], min_tokens=4)
    pieces = []
    for ch in "a,b,c,d":
        stopped = it.add(ord(ch))
        pieces.append(it.take(final=stopped))
        if stopped:
            break
    assert it.stopped and it.text == "a,b,c" and "".join(pieces) == "a,b,c"  # the commas in tokens 2 and 4 did not count


def test_only_plain_sampling_goes_speculative():
    """Speculative rounds sample by temperature and top_p alone: anything else they would silently drop."""
    from archon_server.engine.types import GenParams

    spec = {"method": "fixed", "k": 3, "draft": "ngram"}
    assert GenParams(speculative=spec).speculable and not GenParams().speculable
    for extra in ({"n": 2}, {"grammar": "start: /x/"}, {"top_k": 5}, {"min_p": 0.1}, {"repetition_penalty": 1.2},
                  {"presence_penalty": 0.5}, {"frequency_penalty": -0.5}, {"min_tokens": 4}):
        assert not GenParams(speculative=spec, **extra).speculable, extra


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(3, 100)
    dev = torch.device("cpu")

    def draw(seed):
        rows = [RowSampling(1.0, 1.0, None, make_generator(choice_seed(seed, i), dev)) for i in range(3)]
        return [sample_rows(logits, rows) for _ in range(5)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert sample_rows(logits, [RowSampling(0.0)] * 3) == logits.argmax(-1).tolist()


def test_inverse_cdf_draw_follows_the_distribution():
    """``draw`` replaces torch.multinomial (16x slower over a 49k vocabulary): a chi-square test
    against the weights (unnormalised, with zero-weight tokens that must never come up)."""
    import numpy as np
    from scipy.stats import chisquare

    g = torch.Generator().manual_seed(3)
    w = torch.softmax(torch.randn(20, generator=g) * 1.5, -1) * 3.0  # sums to 3, not 1
    w[[0, 7, 19]] = 0.0
    counts = np.bincount([draw(w, g) for _ in range(20000)], minlength=20)
    assert counts[[0, 7, 19]].sum() == 0
    nz = w > 0
    e = w[nz].double().numpy()
    expected = e / e.sum() * counts.sum()  # normalised in float64: chisquare checks that the sums agree
    assert chisquare(counts[nz.numpy()], expected).pvalue > 1e-3
    one_hot = torch.zeros(49152)
    one_hot[49151] = 1.0
    assert draw(one_hot, g) == 49151 and draw(torch.tensor([0.0, 0.0, 1.0]), g) == 2


def test_thread_tuner_moves_to_the_faster_setting_and_back():
    from archon_server.engine.threads import ThreadTuner

    applied: list[int] = []
    tuner = ThreadTuner([1, 2], period=5, probe=3, set_threads=applied.append)
    speed = {1: 0.05, 2: 0.5}  # contended cores: one thread is 10x faster

    def run(steps: int) -> None:
        for _ in range(steps):
            tuner.before_step()
            tuner.after_step(speed[applied[-1]])

    assert tuner.current == 2
    run(6)  # the first probe comes early
    assert tuner.current == 1 and tuner.switches == 1
    slow_steps = applied.count(2)
    run(100)  # probes of the slow setting stop after one step each, and grow rarer
    assert tuner.current == 1 and tuner.switches == 1
    assert applied.count(2) - slow_steps <= 4 and tuner.probes >= 3
    speed = {1: 0.05, 2: 0.02}  # the cores freed up
    run(200)
    assert tuner.current == 2 and tuner.switches == 2
    run(100)  # stays while 2 is faster
    assert tuner.current == 2 and tuner.switches == 2


def test_a_new_thread_tuner_duels_once_and_acts_only_on_a_decisive_gap():
    """A new tuner used to run `probe` steps of its untested default before its first probe (and the probe's own
    steps): an engine started beside two busy jobs spent ~1.5 s of its first 128-token answer on 2-thread steps of
    often 70-460 ms.  Now its second step tries the fewest threads: 3x cheaper switches at once; a smaller gap (free
    cores, or a first step that paid the pool's warm-up) changes nothing and the regular first probe follows."""
    from archon_server.engine.threads import ThreadTuner

    def steps(speed: dict[int, float], n: int) -> tuple[ThreadTuner, list[int]]:
        applied: list[int] = []
        tuner = ThreadTuner([1, 2], period=48, probe=4, set_threads=applied.append)
        used: list[int] = []
        for _ in range(n):
            tuner.before_step()
            used.append(applied[-1])
            tuner.after_step(speed[applied[-1]])
        return tuner, used

    busy, used = steps({1: 0.02, 2: 0.2}, 60)
    assert used[:3] == [2, 1, 1] and used.count(2) <= 2 and busy.current == 1 and busy.switches == 1
    free, used = steps({1: 0.011, 2: 0.007}, 60)
    assert used[:6] == [2, 1, 2, 2, 2, 1] and free.current == 2 and free.switches == 0  # the duel, then a regular probe
    warm, used = steps({1: 0.011, 2: 0.007 * 2.5}, 6)  # 2 threads 1.6x dearer: not decisive, judged the regular way
    assert used[:3] == [2, 1, 2]


def test_a_switch_to_fewer_threads_is_not_undone_by_the_cheap_steps_that_follow_idle_time():
    """Right after a switch to 1 thread on busy cores, the next request's first steps run on the scheduler's credit
    for the idle time between requests (11 ms against 18-25 a step); read as the load leaving, they set off a
    2-thread probe of 200-460 ms.  A switch now spaces early probes as a probe does."""
    from archon_server.engine.threads import ThreadTuner

    applied: list[int] = []
    tuner = ThreadTuner([1, 2], period=48, probe=4, set_threads=applied.append)
    used: list[int] = []

    def run(costs: list[float]) -> None:
        for c in costs:
            tuner.before_step()
            used.append(applied[-1])
            tuner.after_step(c if applied[-1] == 1 else 0.3)

    run([0.025] * 12)  # busy: the tuner moves to 1 thread
    assert tuner.current == 1
    before = len(used)
    run([0.011] * 10 + [0.022] * 20)  # a new request: cheap steps at first, then the busy pace again (within a period)
    assert used[before:].count(2) == 0


def test_thread_tuner_probes_at_once_when_load_arrives_after_probes_grew_rare():
    """Quiet for long, the tuner checks rarely; load that arrives then (2 threads 10x slower) must move it to 1
    thread within a few steps (it used to wait out the grown period: ~100 steps of 2 threads at up to 860 ms each on
    a loaded 2-core box), step costs that swing from step to step must not set off a probe each, and the cores
    freeing up must bring it back."""
    from archon_server.engine.threads import ThreadTuner

    applied: list[int] = []
    tuner = ThreadTuner([1, 2], period=48, probe=4, set_threads=applied.append)
    speed = {1: 0.023, 2: 0.015}  # quiet: 2 threads faster
    used: list[int] = []  # threads of each step

    def run(steps: int) -> None:
        for _ in range(steps):
            tuner.before_step()
            used.append(applied[-1])
            cost = speed[applied[-1]]
            tuner.after_step(cost() if callable(cost) else cost)

    run(3000)
    assert tuner.current == 2 and tuner._period_now >= 1536  # probes grew rare
    probes, before = tuner.probes, len(used)
    speed = {1: 0.05, 2: 0.2}  # two busy jobs arrived
    run(10)
    assert tuner.current == 1 and used[before:].count(2) <= 3
    run(500)  # steady load: the slow setting's probes stay rare
    assert tuner.current == 1 and tuner.probes <= probes + 7
    rng = random.Random(0)  # busy cores: a step's cost swings 2-2.5x from one step to the next
    speed = {1: lambda: rng.uniform(0.04, 0.1), 2: lambda: rng.uniform(0.2, 0.5)}
    probes, before = tuner.probes, len(used)
    run(1000)
    assert tuner.current == 1 and tuner.probes - probes <= 8 and used[before:].count(2) <= 8
    speed = {1: 0.023, 2: 0.015}  # they ended: back within the early probes' spacing (grown by the noisy phase)
    gap = tuner._shift_gap
    assert gap <= 1024
    run(gap + 10)
    assert tuner.current == 2
    switches = tuner.switches
    run(1000)  # steady again: the noise-free costs never look shifted
    assert tuner.current == 2 and tuner.switches == switches


def test_penalties_follow_vllm_semantics():
    from archon_server.engine.sampling import apply_penalties

    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    rep = apply_penalties(logits, RowSampling(repetition_penalty=2.0, prompt_ids=[0], output_ids=[1]))
    assert rep.tolist() == [1.0, -4.0, 1.0, 0.5]
    pf = apply_penalties(logits, RowSampling(presence_penalty=0.5, frequency_penalty=0.25, output_ids=[2, 2, 3]))
    assert pf.tolist() == [2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25]
    # greedy with a penalty picks the best *penalized* token
    assert sample_rows(logits[None], [RowSampling(0.0, repetition_penalty=4.0, output_ids=[0])]) == [2]


def test_a_constraint_masks_every_draw_and_hears_each_token():
    """sample_rows asks a row's constraint (engine/constrain.py) to mask the logits, then tells it the token drawn."""

    class OnlyEven:
        def __init__(self):
            self.seen = []

        def mask(self, row):
            out = row.clone()
            out[1::2] = float("-inf")
            return out

        def accept(self, tok):
            self.seen.append(tok)

    logits = torch.zeros(2, 10)
    logits[:, 3] = 9.0  # the unconstrained favourite is odd
    c0, c1 = OnlyEven(), OnlyEven()
    rows = [RowSampling(temperature=0.0, constraint=c0), RowSampling(temperature=1.0, generator=make_generator(1, torch.device("cpu")), constraint=c1)]
    for _ in range(20):
        toks = sample_rows(logits, rows)
        assert all(t % 2 == 0 for t in toks)
    assert len(c0.seen) == len(c1.seen) == 20 and logits[0, 3] == 9.0  # the shared logits are left as they were


def test_the_loading_thread_ends_and_hands_back_result_or_error():
    """load_engine's torch work runs in a thread that ends (its OpenMP pool with it: engine/threads.py)."""
    import threading

    from archon_server.engine.threads import in_fresh_thread

    seen = []
    assert in_fresh_thread(lambda: seen.append(threading.current_thread()) or 7) == 7
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(KeyError, match="boom"):
        in_fresh_thread(lambda: {}["boom"])
    assert not [t for t in threading.enumerate() if t.name == "archon-engine-loader"]


@pytest.mark.parametrize("kv_heads,groups,head_dim", [(3, 3, 64), (1, 4, 256)])  # SmolLM2's and gemma3-270m's heads
def test_decode_attention_by_products_gives_the_same_bits_at_any_thread_count(kv_heads, groups, head_dim):
    """A decode step's attention (a few queries per KV head over a float32 cache) has the same bits at 1 and 2
    threads, so the thread tuner's changes mid-request do not move a seeded request's tokens (torch's CPU flash
    kernel did: 3 queries per head at 1 and 2 threads ~1e-7 apart); it is the attention SDPA computes, with the
    log-sum-exp the flash op returns; rows of different lengths (an additive -inf mask) included."""
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    try:
        for rows, keys in ((1, 45), (6, 700), (3, 3000)):
            q = torch.randn(rows, kv_heads, groups, head_dim, generator=g)
            k = torch.randn(rows, kv_heads, keys, head_dim, generator=g)
            v = torch.randn(rows, kv_heads, keys, head_dim, generator=g)
            mask = torch.zeros(rows, 1, groups, keys)
            mask[0, :, :, keys - 7 :] = float("-inf")  # the first row is 7 tokens shorter than the others
            results = []
            for n in (1, 2):
                torch.set_num_threads(n)
                results.append((attend_by_products(q, k, v, mask, 0.125), *attend_by_products_lse(q, k, v, mask, 0.125)))
            (out1, lse_out1, lse1), (out2, lse_out2, lse2) = results
            assert torch.equal(out1, out2) and torch.equal(lse_out1, lse_out2) and torch.equal(lse1, lse2)
            torch.set_num_threads(threads)
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125)
            assert torch.allclose(out1, want, atol=2e-6) and torch.allclose(lse_out1, want, atol=2e-6)
            if flash is not None:
                want_lse = flash(q, k, v, attn_mask=mask, scale=0.125)[1]
                assert torch.allclose(lse1, want_lse, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_exact_linear_gives_a_row_the_same_bits_whatever_rows_come_with_it(dtype):
    """The prefill's linears: a chunk of any size (a short tail after a prefix-cache hit included) computes each
    row exactly as the row inside a long chunk, with and without bias, at 1 and 2 threads (plain F.linear does not
    on AVX2 float32: MKL's kernels for 1-3, 5-7, 9-11 rows sum in another order)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1728, 576, generator=g).to(dtype)
    bias = torch.randn(1728, generator=g).to(dtype)
    x = torch.randn(1, 300, 576, generator=g).to(dtype)
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            for b, packed in ((None, None), (bias, None), (bias, pack_for_decode(w))):  # (the engine's prefill passes its packed copy)
                whole = row_exact_linear(x, w, b, packed)
                for start, rows in ((0, 1), (5, 2), (17, 3), (40, 7), (64, 11), (100, 12), (200, 16), (250, 50)):
                    part = row_exact_linear(x[:, start : start + rows], w, b, packed)
                    assert part.shape == (1, rows, 1728)
                    assert torch.equal(part, whole[:, start : start + rows])
    finally:
        torch.set_num_threads(threads)


def test_kernel_timings_alternate_so_a_burst_of_other_work_cannot_decide_the_choice(monkeypatch):
    """A fake clock: "fast" costs 1.0, "slow" 1.5, and a burst of other work on the cores doubles the two kernel
    runs after the first (a warm-up). Timed one candidate after the other, the burst covers both of fast's timed
    runs and slow wins; alternated, each candidate gets a run outside it."""
    from archon_server.engine import runner as runner_module

    now, runs = [0.0], [0]

    def kernel(cost: float):
        def run() -> None:
            runs[0] += 1
            now[0] += cost * (2 if runs[0] in (2, 3) else 1)
        return run

    monkeypatch.setattr(runner_module.time, "perf_counter", lambda: now[0])
    best = runner_module.best_times({"fast": kernel(1.0), "slow": kernel(1.5)}, repeats=2)
    assert best == {"fast": 1.0, "slow": 1.5}
