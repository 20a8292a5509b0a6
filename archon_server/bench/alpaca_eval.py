"""AlpacaEval 2.0 metrics: raw win rate and the length-controlled win rate (``length_controlled_v1``).

Pure functions over judged rows.  A row says, for one instruction, how much the judge
preferred the system's output (``output_2``) over the baseline's (``output_1``):
``preference`` in [1, 2] (1 = baseline better, 2 = system better); 0, missing or
unparseable means a draw (1.5), as upstream does.

Length control follows alpaca_eval's ``metrics/glm_winrate.py`` (re-implemented, not
copied): a logistic GLM per system on the soft label y = preference − 1 with the terms

    θ_len · tanh(Δ/σ)        Δ = len(baseline) − len(system) in characters, σ = std(Δ)
    θ_diff · d_i             d_i = a fixed per-instruction difficulty
    θ_model · 1              the system's own intercept (no global intercept)

fitted with an L1 penalty (liblinear) and C chosen by 5-fold GroupKFold CV.  LC is the
mean predicted preference with Δ = 0, i.e. "what would the judge say if both outputs
had the same length".  Rows are aligned with difficulties *by instruction text*, never
by row position (upstream's position lookup misaligns short annotation files).

The difficulties come from one joint fit over many systems (:func:`estimate_difficulty`)
or from a file (:func:`load_difficulty`).

Regularisation of the length slope (:class:`SlopePrior`).  Upstream always adds the judge's
annotations of a deliberately verbose and a deliberately concise GPT-4-Turbo against GPT-4-Turbo
(805 rows each, weight 0.1, no system intercept).  Those rows can only be explained by θ_len
(and θ_diff), so they pull every system's slope toward the judge's *pure length bias*; without
them a system whose outputs are all shorter (or longer) than the baseline has a badly identified
slope, and its LC drifts by points.  The files are not available offline, so we add what they
amount to: synthetic rows x = (±1, 0, 0) with soft label σ(±μ), whose own optimum is θ_len = μ.
μ is the judge's length bias as upstream measured it — the mean θ_len of the
``gpt4_1106_preview_verbose`` / ``_concise`` fits in the shipped ``glm_weights`` file (−1.613) —
and the rows carry the same total weight as upstream's (2 × 805 × 0.1 = 161).  Neither number
is tuned on leaderboard values.  Real gamed-baseline annotations, when given, replace the prior.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DRAW = 1.5
EVAL_SET = "alpaca_eval/model_outputs/gpt4_1106_preview.json"
BASELINE = "gpt4_1106_preview"
# Upstream's grid for LogisticRegressionCV (Cs=10 -> logspace(-4, 4, 10)).
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 4, 10))


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Judged:
    """One judged instruction: the preference for the system over the baseline, and both lengths."""

    instruction: str
    preference: float  # in [1, 2]; draws already resolved to 1.5
    len_baseline: int
    len_model: int


def normalize_preference(value: Any) -> float:
    """Map an upstream ``preference`` to [1, 2]: strings are parsed; 0, None, NaN or junk become a draw."""
    if value is None:
        return DRAW
    try:
        p = float(value)
    except (TypeError, ValueError):
        return DRAW
    if math.isnan(p) or p == 0:
        return DRAW
    if not 1.0 <= p <= 2.0:
        raise ValueError(f"preference {value!r} outside [1, 2]")
    return p


ANNOTATION_FIELDS = ("instruction", "output_1", "output_2", "preference")


def load_annotations(path: str | os.PathLike[str]) -> dict[str, list[Judged]]:
    """Read an official annotations JSON (``output_1`` = baseline, ``output_2`` = system), grouped by ``generator_2``.

    Every row must carry ``instruction``, ``output_1``, ``output_2`` and ``preference`` (null allowed: a draw, as
    upstream): anything else, a ``model_outputs.json`` above all, is refused with a :class:`ValueError` naming the
    file and the missing fields, instead of being scored as all draws of empty outputs."""
    with open(path, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON annotations file ({e})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: an annotations file is a non-empty JSON list of rows")
    missing = sorted({k for r in rows for k in ANNOTATION_FIELDS if k not in r})
    if missing:
        hint = " (this looks like a model_outputs file: score its annotations, not its outputs)" if "output" in rows[0] else ""
        raise ValueError(f"{path}: not AlpacaEval annotations: rows lack {', '.join(missing)}{hint}")
    out: dict[str, list[Judged]] = defaultdict(list)
    for r in rows:
        out[str(r.get("generator_2") or Path(path).stem)].append(
            Judged(
                instruction=r["instruction"],
                preference=normalize_preference(r.get("preference")),
                len_baseline=len(r.get("output_1") or ""),
                len_model=len(r.get("output_2") or ""),
            )
        )
    return dict(out)


def load_eval_instructions(root: str | os.PathLike[str] | None = None) -> list[str]:
    """The 805 AlpacaEval instructions in eval-set order (position = ``idx`` in compact files)."""
    from .paths import data_file

    with open(data_file(EVAL_SET, root), encoding="utf-8") as f:
        return [r["instruction"] for r in json.load(f)]


def load_compact(path: str | os.PathLike[str], instructions: Sequence[str]) -> dict[str, list[Judged]]:
    """Read the compact CSV (``model, idx, preference, len_baseline, len_model``); ``idx`` indexes ``instructions``."""
    opener = gzip.open if str(path).endswith(".gz") else open
    out: dict[str, list[Judged]] = defaultdict(list)
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        for r in csv.DictReader(f):
            out[r["model"]].append(
                Judged(
                    instruction=instructions[int(r["idx"])],
                    preference=normalize_preference(r["preference"]),
                    len_baseline=int(r["len_baseline"]),
                    len_model=int(r["len_model"]),
                )
            )
    return dict(out)


# --------------------------------------------------------------------------- raw win rate


@dataclass
class WinRate:
    win_rate: float  # mean(preference − 1) · 100
    standard_error: float  # s.e.m. (ddof=1) of the same, in points
    n_wins: int
    n_wins_base: int
    n_draws: int
    n_total: int
    discrete_win_rate: float  # wins + draws/2 over n, in points

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def win_rate(preferences: Iterable[Any]) -> WinRate:
    """Raw AlpacaEval win rate from preferences in [1, 2] (draw markers are normalised here too)."""
    p = np.array([normalize_preference(x) for x in preferences], dtype=float) - 1.0
    n = len(p)
    if n == 0:
        raise ValueError("no preferences")
    se = float(p.std(ddof=1) / math.sqrt(n) * 100) if n > 1 else float("nan")
    wins = int((p > 0.5).sum())
    losses = int((p < 0.5).sum())
    draws = n - wins - losses
    return WinRate(
        win_rate=float(p.mean() * 100),
        standard_error=se,
        n_wins=wins,
        n_wins_base=losses,
        n_draws=draws,
        n_total=n,
        discrete_win_rate=(wins + draws / 2) / n * 100,
    )


# --------------------------------------------------------------------------- soft-label logistic fits


def _soft_rows(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row twice: label 1 with weight w·y and label 0 with weight w·(1 − y) (the soft-label trick)."""
    X2 = np.vstack([X, X])
    y2 = np.concatenate([np.ones(len(y)), np.zeros(len(y))])
    w2 = np.concatenate([w * y, w * (1.0 - y)])
    return X2, y2, w2


def _penalty_kwargs(kind: str) -> dict[str, Any]:
    """scikit-learn >= 1.8 spells the penalty as ``l1_ratio`` (``penalty`` is deprecated); older ones need ``penalty``."""
    import sklearn

    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return {"l1_ratio": 1.0 if kind == "l1" else 0.0}
    return {"penalty": kind}


def _fit_l1(X: np.ndarray, y: np.ndarray, w: np.ndarray, C: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    X2, y2, w2 = _soft_rows(X, y, w)
    keep = w2 > 0  # liblinear ignores zero weights anyway; dropping them keeps both classes present when possible
    model = LogisticRegression(
        **_penalty_kwargs("l1"), solver="liblinear", C=C, fit_intercept=False, random_state=123, max_iter=1000, tol=1e-6
    )
    model.fit(X2[keep], y2[keep], sample_weight=w2[keep])
    return model.coef_[0].copy()


def _soft_log_loss(X: np.ndarray, y: np.ndarray, w: np.ndarray, coef: np.ndarray) -> float:
    z = X @ coef
    # log σ(z) and log(1 − σ(z)) computed stably
    return float(np.sum(w * (y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z))) / np.sum(w))


def fit_soft_logistic_cv(
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray | None = None,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    n_splits: int = 5,
) -> tuple[np.ndarray, float]:
    """L1 logistic regression on soft labels, C by GroupKFold CV; returns (coef, C).

    Both copies of a row share a group, so they always fall in the same fold.  Folds are
    scored by held-out weighted log-loss: plain accuracy (sklearn's default) cannot tell
    Cs apart on duplicated soft rows, because exactly one copy of every row is "right".
    """
    from sklearn.model_selection import GroupKFold

    w = np.ones(len(y)) if w is None else np.asarray(w, dtype=float)
    groups = np.arange(len(y))
    losses = np.zeros(len(Cs))
    for train, test in GroupKFold(n_splits=n_splits).split(X, y, groups):
        for k, C in enumerate(Cs):
            coef = _fit_l1(X[train], y[train], w[train], C)
            losses[k] += _soft_log_loss(X[test], y[test], w[test], coef)
    best = float(Cs[int(np.argmin(losses))])  # ties -> the smaller C, i.e. the simpler model
    return _fit_l1(X, y, w, best), best


# --------------------------------------------------------------------------- instruction difficulty


def _features_len(rows: Sequence[Judged]) -> np.ndarray:
    """tanh(Δ/σ) with Δ = len(baseline) − len(model), σ = sample std of Δ over this system's rows."""
    delta = np.array([r.len_baseline - r.len_model for r in rows], dtype=float)
    sd = delta.std(ddof=1) if len(delta) > 1 else 0.0
    return np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)


def estimate_difficulty(
    systems: Mapping[str, Sequence[Judged]], *, l2_C: float = 1.0
) -> dict[str, float]:
    """Per-instruction difficulty from one joint soft-label logistic fit over many systems.

    Terms: a per-system intercept, a per-system length slope on tanh(Δ/σ_system), and one
    coefficient per instruction; d_i is that coefficient (how easily systems beat the
    baseline on instruction i, length held equal).  A mild L2 penalty (``l2_C`` per row)
    pins the constant that system intercepts and instruction terms could trade, and
    shrinks instructions seen by few systems.  Returns {instruction: d_i}.
    """
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    names = sorted(systems)
    instr: dict[str, int] = {}
    for s in names:
        for r in systems[s]:
            instr.setdefault(r.instruction, len(instr))
    n_s, n_i = len(names), len(instr)
    rows_idx, cols, vals, ys = [], [], [], []
    row = 0
    for k, s in enumerate(names):
        rs = systems[s]
        tl = _features_len(rs)
        for r, t in zip(rs, tl):
            rows_idx += [row, row, row]
            cols += [k, n_s + k, 2 * n_s + instr[r.instruction]]
            vals += [1.0, float(t), 1.0]
            ys.append(r.preference - 1.0)
            row += 1
    X = sparse.csr_matrix((vals, (rows_idx, cols)), shape=(row, 2 * n_s + n_i))
    y = np.array(ys)
    X2 = sparse.vstack([X, X]).tocsr()
    y2 = np.concatenate([np.ones(row), np.zeros(row)])
    w2 = np.concatenate([y, 1.0 - y])
    model = LogisticRegression(**_penalty_kwargs("l2"), C=l2_C, solver="lbfgs", fit_intercept=False, max_iter=5000, tol=1e-8)
    model.fit(X2, y2, sample_weight=w2)
    coef = model.coef_[0]
    return {ins: float(coef[2 * n_s + j]) for ins, j in instr.items()}


def load_difficulty(path: str | os.PathLike[str], instructions: Sequence[str] | None = None) -> dict[str, float]:
    """Read a difficulty CSV: columns ``instruction`` (or ``idx`` with ``instructions``) and ``instruction_difficulty``."""
    out: dict[str, float] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            val = float(r.get("instruction_difficulty") or r.get("difficulty") or 0.0)
            if r.get("instruction") is not None:
                out[r["instruction"]] = val
            elif r.get("idx") is not None and instructions is not None:
                out[instructions[int(r["idx"])]] = val
            else:
                raise ValueError(f"{path}: need an `instruction` column (or `idx` plus the eval set)")
    return out


def save_difficulty(difficulty: Mapping[str, float], path: str | os.PathLike[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "instruction_difficulty"])
        for ins, d in difficulty.items():
            w.writerow([ins, repr(d)])


# --------------------------------------------------------------------------- length-controlled win rate

GAMED_BASELINES = ("gpt4_1106_preview_verbose", "gpt4_1106_preview_concise")
GLM_WEIGHTS = "alpaca_eval/glm_weights_length_controlled_v1_baseline_gpt4_1106_preview.csv"


@dataclass(frozen=True)
class SlopePrior:
    """Synthetic regularisation rows pulling θ_len toward ``center`` with total weight ``weight`` (see module doc)."""

    center: float = -1.6130065195429617  # mean θ_len of the verbose/concise baselines in the shipped glm_weights
    weight: float = 161.0  # upstream: 2 gamed baselines × 805 rows × weight 0.1

    def rows(self, n_pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = np.tile([1.0, -1.0], n_pairs)
        X = np.column_stack([a, np.zeros_like(a), np.zeros_like(a)])
        return X, 1.0 / (1.0 + np.exp(-self.center * a)), np.full(len(a), self.weight / len(a))


def load_glm_weights(path: str | os.PathLike[str] | None = None) -> dict[str, tuple[float, float, float]]:
    """Upstream's fitted (θ_len, θ_diff, θ_model) per system from the shipped ``glm_weights`` CSV."""
    from .paths import data_file

    out = {}
    with open(path or data_file(GLM_WEIGHTS), encoding="utf-8", newline="") as f:
        for r in csv.reader(f):
            if r and r[0] and r[0] != "":
                try:
                    out[r[0]] = (float(r[1]), float(r[2]), float(r[3]))
                except ValueError:
                    continue
    return out


def slope_prior_from_weights(weights: Mapping[str, tuple[float, float, float]], weight: float = 161.0) -> SlopePrior:
    """The judge's pure length bias as upstream fitted it: the mean slope of the gamed baselines."""
    slopes = [weights[g][0] for g in GAMED_BASELINES if g in weights]
    if not slopes:
        raise ValueError(f"the weights have none of {GAMED_BASELINES}")
    return SlopePrior(float(np.mean(slopes)), weight)


@dataclass
class LCResult:
    length_controlled_winrate: float
    lc_standard_error: float  # s.e.m. of the per-instruction predicted preferences (upstream's definition), points
    win_rate: float
    standard_error: float
    theta_len: float
    theta_diff: float
    theta_model: float
    C: float
    n_total: int
    n_missing_difficulty: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _design(rows: Sequence[Judged], difficulty: Mapping[str, float], not_gamed: float) -> tuple[np.ndarray, int]:
    missing = sum(1 for r in rows if r.instruction not in difficulty)
    d = np.array([difficulty.get(r.instruction, 0.0) for r in rows])
    X = np.column_stack([_features_len(rows), d, np.full(len(rows), not_gamed)])
    return X, missing


def length_controlled_win_rate(
    rows: Sequence[Judged],
    difficulty: Mapping[str, float],
    *,
    gamed_baselines: Sequence[Sequence[Judged]] = (),
    gamed_weight: float = 0.1,
    slope_prior: SlopePrior | None = SlopePrior(),
    Cs: Sequence[float] = DEFAULT_CS,
    n_splits: int = 5,
) -> LCResult:
    """Length-controlled win rate of one system (``length_controlled_v1``).

    ``gamed_baselines``: annotations of deliberately verbose/concise versions of the
    *baseline* against the baseline; their rows join the fit with weight ``gamed_weight``
    and no system intercept, which pulls the length slope towards the judge's pure
    length bias ("regularise to baseline").  Without them ``slope_prior``'s synthetic rows
    stand in for them (``None``: upstream's unregularised variant, the system alone).
    Instructions without a difficulty get d = 0 and are counted in ``n_missing_difficulty``.
    """
    if len(rows) < n_splits:
        raise ValueError(f"need at least {n_splits} rows, got {len(rows)}")
    X, missing = _design(rows, difficulty, 1.0)
    y = np.array([r.preference - 1.0 for r in rows])
    w = np.ones(len(rows))
    Xs, ys, ws = [X], [y], [w]
    for g in gamed_baselines:
        Xg, _ = _design(g, difficulty, 0.0)
        Xs.append(Xg)
        ys.append(np.array([r.preference - 1.0 for r in g]))
        ws.append(np.full(len(g), gamed_weight))
    regularised = "gamed baselines" if gamed_baselines else ("slope prior" if slope_prior is not None else "none")
    if not gamed_baselines and slope_prior is not None:
        Xp, yp, wp = slope_prior.rows(len(rows))
        Xs.append(Xp)
        ys.append(yp)
        ws.append(wp)
    coef, C = fit_soft_logistic_cv(np.vstack(Xs), np.concatenate(ys), np.concatenate(ws), Cs=Cs, n_splits=n_splits)
    X_test = X.copy()
    X_test[:, 0] = 0.0  # Δ = 0: both outputs equally long
    pred = 1.0 / (1.0 + np.exp(-(X_test @ coef)))
    raw = win_rate(r.preference for r in rows)
    return LCResult(
        length_controlled_winrate=float(pred.mean() * 100),
        lc_standard_error=float(pred.std(ddof=1) / math.sqrt(len(pred)) * 100),
        win_rate=raw.win_rate,
        standard_error=raw.standard_error,
        theta_len=float(coef[0]),
        theta_diff=float(coef[1]),
        theta_model=float(coef[2]),
        C=C,
        n_total=len(rows),
        n_missing_difficulty=missing,
        extra={"regularised": regularised, **({"slope_prior": asdict(slope_prior)} if regularised == "slope prior" else {})},
    )


def score_systems(
    systems: Mapping[str, Sequence[Judged]],
    difficulty: Mapping[str, float] | None = None,
    *,
    reference_systems: Mapping[str, Sequence[Judged]] | None = None,
    gamed_baselines: Sequence[Sequence[Judged]] = (),
    slope_prior: SlopePrior | None = SlopePrior(),
) -> dict[str, LCResult]:
    """Score several systems; difficulty is estimated jointly over ``systems`` ∪ ``reference_systems`` when not given."""
    if difficulty is None:
        pool = dict(reference_systems or {})
        pool.update(systems)
        difficulty = estimate_difficulty(pool)
    return {s: length_controlled_win_rate(rows, difficulty, gamed_baselines=gamed_baselines, slope_prior=slope_prior)
            for s, rows in systems.items()}


# --------------------------------------------------------------------------- what a sound harness should not believe


def get_is_extreme_changes(prev_winrate: float, new_winrate: float, abs_diff: float = 10, rel_diff: float = 4,
                           min_warn: bool = True, max_warn: bool = True) -> bool:
    """Upstream's warning rule (``glm_winrate.get_is_extreme_changes``): the new (LC) win rate moved more than
    ``abs_diff`` points *and* more than the ``1/rel_diff`` share of the room left in that direction."""
    too_small = new_winrate < min(prev_winrate - (prev_winrate / rel_diff), prev_winrate - abs_diff)
    too_large = new_winrate > max(prev_winrate + ((100 - prev_winrate) / rel_diff), prev_winrate + abs_diff)
    return (too_small and min_warn) or (too_large and max_warn)


NEAR_CONSTANT_DISTINCT = 0.9  # distinct outputs / outputs below this: the system repeats itself
NEAR_CONSTANT_LENGTH_CV = 0.05  # std/mean of output lengths below this: every answer is about as long


def output_flags(outputs: Sequence[str]) -> dict[str, Any]:
    """Distinct-answer ratio and length spread of a system's outputs; flags a near-constant system (a null model
    gets ~85 LC from the leaderboard's own judge, so the score alone cannot be trusted to catch it)."""
    texts = [" ".join((o or "").split()) for o in outputs]
    if not texts:
        return {}
    lens = np.array([len(t) for t in texts], dtype=float)
    distinct = len(set(texts)) / len(texts)
    cv = float(lens.std() / lens.mean()) if lens.mean() > 0 else 0.0
    flags = []
    if len(texts) >= 2 and distinct < NEAR_CONSTANT_DISTINCT:
        flags.append(f"near-constant outputs: {distinct:.0%} distinct")
    if len(texts) >= 2 and cv < NEAR_CONSTANT_LENGTH_CV:
        flags.append(f"near-constant output length: spread {cv:.1%} of {lens.mean():.0f} chars")
    return {"distinct_ratio": round(distinct, 4), "length_cv": round(cv, 4), "flags": flags}


def position_bias(preferences: Sequence[float], swapped: Sequence[bool]) -> dict[str, Any]:
    """The judge's position bias from the seeded swaps: mean win (points) of the system when shown first minus
    when shown second, with its standard error.  Flagged when larger than 10 points and 2 s.e."""
    y = np.array([normalize_preference(p) - 1.0 for p in preferences])
    sw = np.array(swapped, dtype=bool)
    first, second = y[sw], y[~sw]
    if len(first) < 2 or len(second) < 2:
        return {"flags": []}
    bias = float(first.mean() - second.mean()) * 100
    se = float(math.sqrt(first.var(ddof=1) / len(first) + second.var(ddof=1) / len(second))) * 100
    flags = [f"judge position bias: {bias:+.1f} ± {se:.1f} points for the output shown first"] if abs(bias) > max(10.0, 2 * se) else []
    return {"position_bias": round(bias, 2), "position_bias_se": round(se, 2), "n_first": int(len(first)),
            "n_second": int(len(second)), "flags": flags}


def lc_change_flags(raw: float, lc: float) -> list[str]:
    return [f"extreme LC change: raw {raw:.1f} -> LC {lc:.1f} (upstream's get_is_extreme_changes)"] if get_is_extreme_changes(raw, lc) else []


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def load_leaderboard(path: str | os.PathLike[str]) -> dict[str, dict[str, float | None]]:
    """The official leaderboard CSV as {system: {column: float or None}}."""
    out: dict[str, dict[str, float | None]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            name = r.pop("")
            vals: dict[str, float | None] = {}
            for k, v in r.items():
                try:
                    vals[k] = float(v) if v != "" else None
                except ValueError:
                    continue
            out[name] = vals
    return out
