"""Draft layer, acceptance head and loss: small random modules, no target model needed."""

from __future__ import annotations

import argparse

import pytest
import torch

from training.specdec.cli import add_cli
from archon_server.engine.specdec.draft import AcceptHead, DraftConfig, DraftKV, EagleDraft, param_count, soft_bce
from archon_server.engine.specdec.serve import SpeculativeConfig

CFG = DraftConfig(hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=48, vocab_size=50, draft_vocab=20)


def _draft() -> EagleDraft:
    torch.manual_seed(0)
    embed = torch.randn(50, 32)
    m = EagleDraft(CFG, embed, torch.arange(0, 40, 2))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m.eval()


def test_incremental_cache_equals_full_pass_and_rolls_back() -> None:
    m = _draft()
    f = torch.randn(1, 9, 32)
    x = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        full = m(f, x)
        kv = DraftKV()
        a = m(f[:, :5], x[:, :5], kv=kv, start=0)
        b = torch.cat([m(f[:, i : i + 1], x[:, i : i + 1], kv=kv, start=i) for i in range(5, 9)], dim=1)
        assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)
        # roll back to 6 and feed different pairs: positions < 6 are untouched, the rest recomputed
        x2 = x.clone()
        x2[0, 6:] = (x2[0, 6:] + 1) % 50
        c = m(f[:, 6:], x2[:, 6:], kv=kv, start=6)
        assert kv.length == 9
        assert torch.allclose(c, m(f, x2)[:, 6:], atol=1e-5)


def test_restricted_logits_are_minus_inf_outside_the_draft_vocab() -> None:
    m = _draft()
    h = torch.randn(32)
    full = m.full_logits(h)
    assert torch.isinf(full[1]) and full[1] < 0  # odd ids are outside the draft vocabulary
    assert torch.allclose(full[m.vocab_ids], m.logits(h))


def test_head_tied_and_untied() -> None:
    tied, untied = AcceptHead(32, 3, tied=True), AcceptHead(32, 3, tied=False)
    assert param_count(untied) - param_count(tied) == 2 * (32 * 32 + 32)
    x = torch.randn(5, 32)
    p = untied.accept_prob(x)
    assert p.shape == (5,) and bool(((p > 0) & (p < 1)).all())


def test_soft_bce_weights() -> None:
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    mask = torch.ones(2)
    # at p = 0.5 the loss is log 2 whatever the weights (normalised by total weight)
    assert torch.isclose(soft_bce(logits, torch.tensor([1.0, 0.0]), mask), torch.log(torch.tensor(2.0)))
    # the reject class weighs 6x: pushing toward "reject" is cheaper than toward "accept"
    lab = torch.tensor([0.5, 0.5])
    to_reject = soft_bce(torch.tensor([[1.0, 0.0]] * 2), lab, mask)
    to_accept = soft_bce(torch.tensor([[0.0, 1.0]] * 2), lab, mask)
    assert to_reject < to_accept
    # masked positions do not count
    assert torch.isclose(soft_bce(torch.tensor([[5.0, 0.0], [0.0, 0.0]]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])),
                         torch.log(torch.tensor(2.0)))


def test_cli_registers_subcommands() -> None:
    ap = argparse.ArgumentParser()
    add_cli(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["specdec", "bench", "--n-alpaca", "2", "--configs", "fixed:4,specdec_pp:0.5"])
    assert args.specdec_cmd == "bench" and args.n_alpaca == 2
    args = ap.parse_args(["specdec", "train-head", "--mode", "sampled", "--tied"])
    assert args.tied and args.mode == "sampled"


def test_archon_specdec_points_at_the_checkout_tooling(capsys: pytest.CaptureFixture[str]) -> None:
    from archon_server.cli import main

    # any arguments (the old ones included) get the pointer, not an argparse error about them
    assert main(["specdec", "bench", "--n-alpaca", "2"]) == 2
    assert "python -m training.specdec" in capsys.readouterr().err


def test_bench_keeps_the_two_specdec_heads_apart() -> None:
    from training.specdec.bench import parse_configs, summarize

    cs = parse_configs("fixed:1,specdec_pp:0.5:3:1,specdec_pp/proposer:0.5:3:1,cumprob:0.3:3:1")
    assert [c.label for c in cs] == ["fixed k=1", "specdec_pp 0.5 K>=1 K<=3", "specdec_pp/proposer 0.5 K>=1 K<=3",
                                     "cumprob 0.3 K>=1 K<=3"]
    assert [c.reads for c in cs[1:3]] == ["candidate", "proposer"]
    speed, passes, discards = [1.1, 1.0, 1.2, 1.15], [0.75, 0.74, 0.70, 0.71], [0.48, 0.50, 0.45, 0.50]
    rows = [{"config": c.label, "method": c.method, "family": c.family, "speedup_wall": w, "speedup_model": w,
             "target_passes_per_token": t, "discarded_per_token": d} for c, w, t, d in zip(cs, speed, passes, discards)]
    summary = summarize({"rows": rows})
    assert summary["best"]["specdec_pp/proposer"]["config"] == "specdec_pp/proposer 0.5 K>=1 K<=3"
    assert summary["specdec_pp/proposer_over_best_fixed_wall"] == pytest.approx(1.2 / 1.1)
    assert summary["specdec_pp_over_best_fixed_wall"] == pytest.approx(1.0 / 1.1)
    assert summary["specdec_pp/proposer_dominates_best_fixed"] and not summary["specdec_pp_dominates_best_fixed"]


def test_speculative_config_rejects_unknown_keys() -> None:
    assert SpeculativeConfig.from_dict({"method": "fixed", "k": 3}).k == 3
    with pytest.raises(ValueError):
        SpeculativeConfig.from_dict({"method": "fixed", "depth": 3})


def test_ngram_drafter_copies_the_continuation_of_the_last_match() -> None:
    from archon_server.engine.specdec.generate import NgramDrafter

    d = NgramDrafter(vocab_size=20, max_ngram=2)
    d.reset([1, 2, 3, 4, 5, 9, 1, 2])
    proposed = []
    step = d.start_round()
    while step is not None:
        proposed.append(int(step.logits.argmax()))
        step = d.step(proposed[-1])
    assert proposed == [3, 4, 5, 9, 1, 2]
    d.reset([7, 8])
    assert d.start_round() is None  # no earlier occurrence: nothing to draft


def test_int8_draft_steps_match_bf16() -> None:
    """Drafting steps of at most 4 rows use int8 weights; they stay close to bf16 (the draft only
    proposes, so small rounding never changes what is emitted), and training ignores them."""
    m = _draft().to(torch.bfloat16)
    f = torch.randn(1, 6, 32, dtype=torch.bfloat16)
    x = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        ref = m(f, x)
        ref_logits = m.logits(ref[:, -1:])
        q = m.quantize_int8()
        assert q is m and set(m._int8) >= {"fc", "q", "k", "v", "o", "gate", "up", "down", "lm_head"}
        kv = DraftKV()
        m(f[:, :5], x[:, :5], kv=kv, start=0)  # 5 rows: the bf16 path
        step = m(f[:, 5:], x[:, 5:], kv=kv, start=5)  # 1 row: int8
        assert torch.allclose(step.float(), ref[:, 5:].float(), atol=0.15, rtol=0.05)
        logits = m.logits(step)
        assert torch.allclose(logits.float(), ref_logits.float(), atol=0.2, rtol=0.05)
    m.train()
    assert m._lin("q", f[:, :1]).requires_grad  # training uses the bf16/fp32 parameters, not the int8 copies


class _ScriptedTarget:
    """A target whose next token is always (t + 1) % V; enough to drive the loop."""

    def __init__(self, vocab: int = 50):
        self.vocab, self.tokens, self.forward_passes = vocab, [], 0

    @property
    def length(self) -> int:
        return len(self.tokens)

    def _out(self, toks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.full((len(toks), self.vocab), -10.0)
        logits[torch.arange(len(toks)), torch.tensor([(t + 1) % self.vocab for t in toks])] = 10.0
        return logits, torch.zeros(len(toks), 4)

    def prefill(self, toks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        self.tokens = list(toks)
        self.forward_passes += 1
        return self._out(toks)[0][-1:], self._out(toks)[1]

    def prefill_steps(self, toks: list[int]):
        return self.prefill(toks)
        yield  # a generator (one chunk): the loop's interface to a chunked prefill

    def forward(self, toks: list[int], all_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        self.tokens += toks
        self.forward_passes += 1
        return self._out(toks)

    def crop(self, n: int) -> None:
        del self.tokens[n:]


class _ScriptedDrafter:
    """Proposes the right token; its 'hidden state' carries the head's acceptance probability."""

    head = None  # no AcceptHead: the loop treats it as the authors' kind unless a test sets one

    def __init__(self, probs: list[float]):
        self.probs, self.forward_calls, self.seen = probs, 0, []

    def reset(self, tokens: list[int], feats: torch.Tensor) -> None:
        self.last = tokens[-1]

    def commit(self, new_tokens: list[int], new_feats: torch.Tensor) -> None:
        self.last = new_tokens[-1]

    def _step(self, fed: int, j: int):
        from archon_server.engine.specdec.generate import DraftStep

        self.forward_calls += 1
        logits = torch.full((50,), -10.0)
        logits[(fed + 1) % 50] = 10.0
        return DraftStep(torch.tensor([self.probs[min(j, len(self.probs) - 1)]]), logits)

    def start_round(self):
        self.j = 0
        return self._step(self.last, 0)

    def step(self, token: int):
        self.j += 1
        return self._step(token, self.j)

    def accept_prob(self, hidden: torch.Tensor) -> float:
        self.seen.append(float(hidden))
        return float(hidden)

    def proposal_accept_prob(self, step, y: int, q: torch.Tensor, first: bool) -> float:
        return self.accept_prob(step.hidden)


class _Reads:
    def __init__(self, reads: str):
        self.reads = reads


def test_specdec_pp_judges_each_candidate_before_drafting_the_next() -> None:
    """As in the authors' loop: after y_k is drafted, the draft is run on y_k, the head gives
    P_acc(y_k), and only then does the rule decide whether to draft y_{k+1}.  With head
    probabilities 0.9 (y_1) and 0.3 (y_2) and h = 0.5, the risk after y_2 is 1 - 0.27 > 0.5,
    so every round drafts exactly 2 candidates (a one-step-late rule would draft a third)."""
    from archon_server.engine.specdec.generate import speculative_generate
    from archon_server.engine.specdec.policies import SpecDecPP

    drafter = _ScriptedDrafter([0.0, 0.9, 0.3, 0.3])  # index 0: the committed token's step (not judged)
    out, stats = speculative_generate([1, 2, 3], _ScriptedTarget(), drafter, SpecDecPP(0.5), "greedy",
                                      max_new_tokens=13)
    assert out == [(4 + i) % 50 for i in range(13)]
    assert stats.k_per_round[:-1] and all(k == 2 for k in stats.k_per_round[:-1])
    assert all(a == k for a, k in zip(stats.accepted_per_round, stats.k_per_round))
    assert drafter.seen[:2] == pytest.approx([0.9, 0.3])


@pytest.mark.parametrize("min_k", [1, 2])
def test_proposer_head_judges_a_candidate_without_another_draft_step(min_k: int) -> None:
    """A ``proposer`` head judges y_j from the step that proposed it: with P_acc 0.9 (y_1) and
    0.3 (y_2) and h = 0.5 every round drafts 2 candidates with 2 draft forwards (the authors'
    head needs 3); with P_acc(y_1) = 0.4 and K >= 1 it stops after one forward."""
    from archon_server.engine.specdec.generate import speculative_generate
    from archon_server.engine.specdec.policies import SpecDecPP

    probs = [0.9, 0.3, 0.3] if min_k == 2 else [0.4, 0.9]
    drafter = _ScriptedDrafter(probs)
    drafter.head = _Reads("proposer")
    out, stats = speculative_generate([1, 2, 3], _ScriptedTarget(), drafter, SpecDecPP(0.5, min_k=min_k), "greedy",
                                      max_new_tokens=13)
    assert out == [(4 + i) % 50 for i in range(13)]
    k = 2 if min_k == 2 else 1
    assert stats.k_per_round[:-1] and all(n == k for n in stats.k_per_round[:-1])
    assert stats.draft_forward_passes == stats.num_draft_tokens
    assert stats.head_calls == stats.num_draft_tokens - 1  # the last round is cut by max_tokens: nothing to decide
    assert drafter.seen[:k] == pytest.approx(probs[:k])


def test_proposer_head_round_trip_and_inputs(tmp_path) -> None:
    from archon_server.engine.specdec.draft import proposal_stats

    with pytest.raises(ValueError, match="reads"):
        AcceptHead(16, reads="output")
    head = AcceptHead(16, 2, reads="proposer")
    q = torch.softmax(torch.randn(3, 10), -1)
    y = torch.tensor([0, 4, 9])
    st = proposal_stats(q, q[torch.arange(3), y], 1.0)
    assert st.shape == (3, 6)
    assert torch.allclose(st[:, 0].exp(), q[torch.arange(3), y])
    assert torch.allclose(st[:, 4], -(q * q.log()).sum(-1))
    assert bool((st[:, 2] >= st[:, 3]).all())
    x = AcceptHead.proposer_input(torch.randn(3, 16), torch.randn(3, 16), st)
    head.save(tmp_path, {"verify_mode": "greedy"})
    loaded, meta = AcceptHead.load(tmp_path)
    assert meta["reads"] == "proposer" and loaded.reads == "proposer"
    assert torch.allclose(loaded(x), head(x), atol=1e-2)  # stored in float16


def test_loads_the_authors_head_format(tmp_path) -> None:
    """The authors' head (``nn.Sequential([ResBlock] * n, Linear(h, 2))`` saved by the hub mixin:
    config.json + model.safetensors, repeated names of the shared block dropped) loads tied and
    computes the same logits."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    w, b = torch.randn(16, 16) * 0.1, torch.randn(16) * 0.1
    ow, ob = torch.randn(2, 16), torch.randn(2)
    (tmp_path / "config.json").write_text('{"hidden_size": 16, "num_layers": 3}')
    save_file({"model.0.linear.weight": w, "model.0.linear.bias": b, "model.3.weight": ow, "model.3.bias": ob},
              str(tmp_path / "model.safetensors"))
    head, meta = AcceptHead.load(tmp_path)
    assert meta["tied"] and meta["blocks"] == 3
    x = torch.randn(5, 16)
    ref = x
    for _ in range(3):
        ref = ref + torch.nn.functional.silu(ref @ w.T + b)
    ref = ref @ ow.T + ob
    assert torch.allclose(head(x), ref, atol=1e-5)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"model.0.linear.weight": w, "model.0.linear.bias": b}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="model.3.weight"):
        AcceptHead.load(tmp_path)  # output layer missing: a clear error, not a half-loaded head


def test_auc_matches_pairwise_count() -> None:
    from training.specdec.train import auc

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40,), generator=g).float()  # many ties
    for labels in ((torch.rand(40, generator=g) > 0.5).float(), torch.rand(40, generator=g)):
        num = den = 0.0
        for i in range(40):
            for j in range(40):
                if i == j:
                    continue
                w = float(labels[i] * (1 - labels[j]))
                den += w
                num += w * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
        assert auc(scores, labels) == pytest.approx(num / den)
    assert auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
