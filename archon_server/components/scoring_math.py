"""Pure math of the scoring rankers: preferences from next-token log-probs, expected ratings,
tournament schedules and Bradley-Terry strengths.  No I/O; the scorer component calls these."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

# Rating labels of the pointwise judge, read as single tokens ("10" counts where the tokenizer has it as one).
RATING_LABELS = tuple(str(i) for i in range(1, 11))


def preference(p_a: float, p_b: float) -> float:
    """P(first shown is better) from the judge's probabilities of answering "a" and "b" (0.5 when neither shows:
    the judge said something else, which is no evidence either way)."""
    total = p_a + p_b
    return 0.5 if total <= 0 else p_a / total


def swapped_preference(first_as_a: tuple[float, float], first_as_b: tuple[float, float]) -> float:
    """P(x better than y) averaged over both presentation orders (position-bias control as in AlpacaEval):
    ``first_as_a``: (P(a), P(b)) with x shown as (a); ``first_as_b``: (P(a), P(b)) with x shown as (b)."""
    return 0.5 * (preference(*first_as_a) + (1.0 - preference(*first_as_b)))


def expected_rating(top: Iterable[tuple[str, float]], labels: Sequence[str] = RATING_LABELS) -> float | None:
    """Probability-weighted mean rating over the rating tokens among the judge's top next tokens
    (renormalised over them); None when no rating token is among them."""
    mass: dict[str, float] = {}
    for tok, lp in top:
        t = tok.strip()
        if t in labels:
            mass[t] = mass.get(t, 0.0) + math.exp(lp)
    total = sum(mass.values())
    if total <= 0:
        return None
    return sum(float(lab) * p for lab, p in mass.items()) / total


def round_robin(k: int) -> list[tuple[int, int]]:
    """Every unordered pair once."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def knockout_round(alive: Sequence[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Pairs of one knockout round in seed order (1v2, 3v4, ...) and the bye (odd one out, advances)."""
    pairs = [(alive[i], alive[i + 1]) for i in range(0, len(alive) - 1, 2)]
    byes = [alive[-1]] if len(alive) % 2 else []
    return pairs, byes


def bradley_terry(k: int, results: Iterable[tuple[int, int, float]], prior: float = 0.0, iters: int = 500, tol: float = 1e-10) -> list[float]:
    """Bradley-Terry log-strengths from soft pairwise results ``(i, j, w)``: ``w`` = how much i beat j in one
    comparison (1 win, 0 loss, 0.5 draw, or a judge's probability).

    Fitted by Hunter's (2004) MM iteration ``p_i <- W_i / sum_j n_ij / (p_i + p_j)``.  ``prior`` adds that
    many virtual draws of every player against a fixed reference of strength 1, which keeps the maximum
    finite when a player won (or lost) everything, as in a knockout.  Returned as log-strengths with mean 0
    (only differences mean anything); a player with no comparisons and no prior gets 0.
    """
    wins = [0.0] * k
    games: dict[tuple[int, int], float] = {}
    for i, j, w in results:
        if i == j:
            continue
        w = min(1.0, max(0.0, float(w)))
        wins[i] += w
        wins[j] += 1.0 - w
        key = (min(i, j), max(i, j))
        games[key] = games.get(key, 0.0) + 1.0
    p = [1.0] * k
    for _ in range(iters):
        new = []
        for i in range(k):
            denom = 2.0 * prior / (p[i] + 1.0) if prior else 0.0
            for (a, b), n in games.items():
                if a == i:
                    denom += n / (p[i] + p[b])
                elif b == i:
                    denom += n / (p[i] + p[a])
            num = wins[i] + prior
            new.append(num / denom if denom > 0 and num > 0 else (p[i] if denom == 0 else 1e-12))
        if prior == 0:  # without an anchor the scale floats: pin the geometric mean
            g = math.exp(sum(math.log(x) for x in new) / k)
            new = [x / g for x in new]
        delta = max(abs(math.log(a) - math.log(b)) for a, b in zip(new, p))
        p = new
        if delta < tol:
            break
    logs = [math.log(x) for x in p]
    mean = sum(logs) / k if k else 0.0
    return [v - mean for v in logs]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
