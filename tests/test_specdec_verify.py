"""Losslessness of the verification rules on toy distributions (no model needed).

Each trial drafts K=3 candidates from position-dependent draft distributions q_j and
verifies them against target distributions p_j (prefix-independent, so the emitted token
at position j must follow p_j exactly).  A chi-square test compares the empirical counts
of the first and second emitted tokens with p; a wrong rule (e.g. accepting with q/p or
resampling from p instead of the residual) fails by a wide margin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from archon_server.engine.specdec.policies import (CumProb, DraftState, Entropy, FixedK, Heuristic, SpecDecPP,
                                                   Confidence, make_policy, rejection_risk)
from archon_server.engine.specdec.sampling import SamplingConfig, probs_from_logits, top_p_filter
from archon_server.engine.specdec.verify import verify, verify_greedy

V, K, TRIALS = 12, 3, 8000


def _dists(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(K + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(K, V, generator=g) * 1.5, -1)
    q[:, 0] = 0.0  # the draft cannot propose token 0 (like a restricted draft vocabulary)
    q = q / q.sum(-1, keepdim=True)
    return p, q


def _expected(p: torch.Tensor, n: float) -> np.ndarray:
    e = p.double().numpy()
    return e / e.sum() * n  # renormalise in float64: chisquare checks that the sums agree


def _emit(mode: str, p: torch.Tensor, q: torch.Tensor, seed: int) -> np.ndarray:
    """Counts [2, V] of the first and second emitted token over TRIALS rounds."""
    g = torch.Generator().manual_seed(seed)
    counts = np.zeros((2, V))
    for _ in range(TRIALS):
        cands = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(K)]
        k, nxt = verify(mode, cands, p, q if mode == "sampled" else None, g)
        emitted = cands[:k] + [nxt]
        counts[0, emitted[0]] += 1
        if len(emitted) > 1:
            counts[1, emitted[1]] += 1
    return counts


@pytest.mark.parametrize("mode", ["sampled", "point_mass"])
def test_emitted_tokens_follow_target(mode: str) -> None:
    p, q = _dists(1)
    counts = _emit(mode, p, q, seed=2)
    for pos in range(2):
        n = counts[pos].sum()
        assert n > 300  # point_mass accepts rarely, so fewer second tokens
        res = chisquare(counts[pos], _expected(p[pos], n))
        assert res.pvalue > 1e-3, (mode, pos, res)


def test_chisquare_detects_a_wrong_rule() -> None:
    """Control: resampling from p on rejection (instead of the residual) is biased, and the test sees it."""
    p, q = _dists(1)
    g = torch.Generator().manual_seed(3)
    counts = np.zeros(V)
    for _ in range(TRIALS):
        y = int(torch.multinomial(q[0], 1, generator=g))
        if float(torch.rand((), generator=g)) < min(1.0, float(p[0, y] / q[0, y])):
            counts[y] += 1
        else:
            counts[int(torch.multinomial(p[0], 1, generator=g))] += 1
    assert chisquare(counts, _expected(p[0], TRIALS)).pvalue < 1e-6


def test_sampled_accepts_everything_when_draft_equals_target() -> None:
    p, _ = _dists(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        cands = [int(torch.multinomial(p[j], 1, generator=g)) for j in range(K)]
        k, _ = verify("sampled", cands, p, p[:K], g)
        assert k == K


def test_greedy_rule() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    assert verify_greedy([1, 0], logits) == (2, 2)  # both match, bonus = argmax of the last row
    assert verify_greedy([1, 2], logits) == (1, 0)  # second rejected, replaced by argmax
    assert verify_greedy([2, 0], logits) == (0, 1)


def test_temperature_and_top_p_shape_the_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    greedy = probs_from_logits(logits, SamplingConfig(0.0))
    assert greedy.tolist() == [1.0, 0.0, 0.0, 0.0]
    hot = probs_from_logits(logits, SamplingConfig(2.0))
    cold = probs_from_logits(logits, SamplingConfig(0.5))
    assert hot[0] < cold[0]
    probs = torch.softmax(logits, -1)  # [0.644, 0.237, 0.087, 0.032]
    kept = top_p_filter(probs, 0.8)
    assert kept[2] == 0 and kept[3] == 0 and torch.isclose(kept.sum(), torch.tensor(1.0))


def test_policies() -> None:
    s = DraftState(k=3, token_probs=[0.9, 0.8, 0.3], entropies=[0.1, 0.2, 2.0], accept_probs=[1.0, 0.9, 0.5])
    assert FixedK(3).should_stop(s) and not FixedK(4).should_stop(s)
    assert Confidence(0.4).should_stop(s) and not Confidence(0.2).should_stop(s)
    assert Entropy(1.0).should_stop(s) and not Entropy(3.0).should_stop(s)
    assert abs(rejection_risk([0.9, 0.8]) - 0.28) < 1e-9
    assert CumProb(0.5).should_stop(s) and not CumProb(0.9).should_stop(s)  # 1 - .216 = .784
    assert SpecDecPP(0.5).should_stop(s) and not SpecDecPP(0.6).should_stop(s)  # 1 - .45 = .55
    h = Heuristic(start=5, min_k=2, max_k=20)
    assert h.begin_round() == 5
    h.end_round(5, 5)
    assert h.begin_round() == 7
    h.end_round(7, 2)
    assert h.begin_round() == 6
    assert make_policy("specdec_pp", 0.3).threshold == 0.3
    with pytest.raises(ValueError):
        make_policy("nope")
