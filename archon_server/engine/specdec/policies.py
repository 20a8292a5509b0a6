"""When to stop drafting: one interface, six rules.

The drafter calls :meth:`StopPolicy.should_stop` after each drafted candidate with a
:class:`DraftState`; the K bounds (``min_k`` / ``max_k``, 2..20 by default) are
enforced by the drafter, so a policy only says whether *it* would stop.  Rules:

- ``fixed``      always K candidates.
- ``heuristic``  HF's ``num_assistant_tokens`` schedule: +2 after a fully accepted
                 round, -1 otherwise.
- ``confidence`` HF "dynamic speculation": stop when the draft's probability of the
                 token it just drafted is below a threshold (HF default 0.4).
- ``entropy``    stop when the draft distribution's entropy (nats) exceeds a threshold.
- ``cumprob``    SpecDec++'s rule with the draft's own probabilities instead of a head:
                 stop when ``1 - prod_j q(y_j) > h`` (the head-free ablation).
- ``specdec_pp`` SpecDec++: stop when ``1 - prod_j P_acc(y_j) > h`` with ``P_acc`` from
                 the trained acceptance head.  The authors' head reads the draft's hidden
                 state at the position whose *input* is the candidate, so it needs one more
                 draft forward per round; a ``proposer`` head (``AcceptHead.reads``) reads the
                 state that proposed it and needs none.  :attr:`StopPolicy.needs_head` tells
                 the drafter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class DraftState:
    """What is known about the current round's candidates ``y_1..y_k``."""

    k: int = 0
    token_probs: list[float] = field(default_factory=list)  # q(y_j) under the drafting distribution
    max_probs: list[float] = field(default_factory=list)  # max_v q(v) at each step
    entropies: list[float] = field(default_factory=list)  # H(q) at each step (nats)
    accept_probs: list[float] = field(default_factory=list)  # head's P_acc(y_j), filled when needs_head


class StopPolicy:
    name = "base"
    needs_head = False

    def __init__(self, min_k: int = 2, max_k: int = 20):
        if not 1 <= min_k <= max_k:
            raise ValueError(f"need 1 <= min_k <= max_k, got {min_k}, {max_k}")
        self.min_k = min_k
        self.max_k = max_k

    def begin_round(self) -> int:
        """Called before drafting; returns this round's maximum K."""
        return self.max_k

    def should_stop(self, state: DraftState) -> bool:
        raise NotImplementedError

    def end_round(self, n_drafted: int, n_accepted: int) -> None:
        """Feedback after verification (adaptive schedules use it)."""

    def describe(self) -> str:
        return self.name


class FixedK(StopPolicy):
    name = "fixed"

    def __init__(self, k: int):
        super().__init__(min_k=k, max_k=k)
        self.k = k

    def should_stop(self, state: DraftState) -> bool:
        return state.k >= self.k

    def describe(self) -> str:
        return f"fixed(k={self.k})"


class Heuristic(StopPolicy):
    """HF ``num_assistant_tokens_schedule="heuristic"``: grow by 2 on full acceptance, shrink by 1 otherwise."""

    name = "heuristic"

    def __init__(self, start: int = 5, min_k: int = 2, max_k: int = 20):
        super().__init__(min_k, max_k)
        self.current = max(min_k, min(max_k, start))

    def begin_round(self) -> int:
        return self.current

    def should_stop(self, state: DraftState) -> bool:
        return state.k >= self.current

    def end_round(self, n_drafted: int, n_accepted: int) -> None:
        step = 2 if n_accepted == n_drafted else -1
        self.current = max(self.min_k, min(self.max_k, self.current + step))


class Confidence(StopPolicy):
    name = "confidence"

    def __init__(self, threshold: float = 0.4, min_k: int = 2, max_k: int = 20):
        super().__init__(min_k, max_k)
        self.threshold = threshold

    def should_stop(self, state: DraftState) -> bool:
        return state.token_probs[-1] < self.threshold

    def describe(self) -> str:
        return f"confidence(t={self.threshold})"


class Entropy(StopPolicy):
    name = "entropy"

    def __init__(self, threshold: float = 1.0, min_k: int = 2, max_k: int = 20):
        super().__init__(min_k, max_k)
        self.threshold = threshold

    def should_stop(self, state: DraftState) -> bool:
        return state.entropies[-1] > self.threshold

    def describe(self) -> str:
        return f"entropy(t={self.threshold})"


def rejection_risk(accept_probs: list[float]) -> float:
    """``1 - prod_j P_acc_j``: the predicted probability that at least one candidate is rejected."""
    log_all = sum(math.log(max(p, 1e-12)) for p in accept_probs)
    return 1.0 - math.exp(log_all)


class CumProb(StopPolicy):
    name = "cumprob"

    def __init__(self, threshold: float = 0.5, min_k: int = 2, max_k: int = 20):
        super().__init__(min_k, max_k)
        self.threshold = threshold

    def should_stop(self, state: DraftState) -> bool:
        return rejection_risk(state.token_probs) > self.threshold

    def describe(self) -> str:
        return f"cumprob(h={self.threshold})"


class SpecDecPP(StopPolicy):
    """Head-based stop rule.  With the authors' head ``accept_probs[0]`` is 1 by convention
    (it runs one step behind, so the committed token comes first); with a ``proposer`` head
    ``accept_probs[j]`` judges candidate ``j + 1``."""

    name = "specdec_pp"
    needs_head = True

    def __init__(self, threshold: float = 0.5, min_k: int = 2, max_k: int = 20):
        super().__init__(min_k, max_k)
        self.threshold = threshold

    def should_stop(self, state: DraftState) -> bool:
        return rejection_risk(state.accept_probs) > self.threshold

    def describe(self) -> str:
        return f"specdec_pp(h={self.threshold})"


def make_policy(method: str, threshold: float | None = None, k: int | None = None,
                min_k: int = 2, max_k: int = 20) -> StopPolicy:
    """Build a policy from the serving config's ``speculative`` block names."""
    if method == "fixed":
        return FixedK(k or 4)
    if method == "heuristic":
        return Heuristic(start=k or 5, min_k=min_k, max_k=max_k)
    if method == "confidence":
        return Confidence(0.4 if threshold is None else threshold, min_k, max_k)
    if method == "entropy":
        return Entropy(1.0 if threshold is None else threshold, min_k, max_k)
    if method == "cumprob":
        return CumProb(0.5 if threshold is None else threshold, min_k, max_k)
    if method in ("specdec_pp", "specdecpp", "specdec++"):
        return SpecDecPP(0.5 if threshold is None else threshold, min_k, max_k)
    raise ValueError(f"unknown speculative method {method!r}")
