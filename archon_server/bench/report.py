"""Sweep reports: a markdown table, a score-vs-cost plot, and outputs in upstream formats.

Scores per benchmark kind:
* auto-graded (MATH, MMLU, CRUXEval, HumanEval): accuracy in %, s.e. of the mean;
* AlpacaEval: raw win rate (s.e.), plus the length-controlled win rate when at least
  ``LC_MIN_ROWS`` instructions were judged (difficulties estimated from the shipped
  official annotations: an approximation when the judge is not GPT-4-Turbo; below that the
  row's ``lc_missing`` note says why); verdicts the judge gave none of (unparsed, failed call)
  are left out, as MT-Bench's and Arena-Hard's, and flagged;
* MT-Bench: mean 1–10 rating over both turns (s.e.), turn 1 / turn 2 in the notes;
* Arena-Hard: weighted win rate vs the baseline with a 95% bootstrap interval.

A pair the sweep skipped (an MMLU ``mode: logprob`` benchmark on an architecture that is not one generator of one
model: records with ``skipped``) has no score; its row's flags say why.  Failed questions (an error recorded: a dead
backend) are flagged, ``N of M failed`` (:func:`failure_flag`, one rule for every benchmark); a logprob question whose
scoring call failed is left out of the accuracy, a failed answer of an auto-graded benchmark counts as wrong; every
question failed: no score ("–", not 0.00), as a judge's missing verdicts.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import alpaca_eval as ae
from .judges import ArenaGame, arena_win_rate

LC_MIN_ROWS = 100


@dataclass
class Row:
    arch: str
    benchmark: str
    n: int
    score: float | None
    se: float | None
    unit: str
    calls_per_q: float
    prompt_tokens: int
    completion_tokens: int
    sec_per_q: float
    errors: int
    judge_calls: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # what a sound harness should not believe (see alpaca_eval flags)


def _sem(x: Sequence[float]) -> float | None:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


_difficulty_cache: dict[str, dict[str, float]] = {}  # data folder -> difficulties


def _official_difficulty(data_root: str | None = None) -> dict[str, float] | None:
    """Instruction difficulties estimated from the shipped compact annotations of ``data_root`` (the --data folder,
    else the default); None without them."""
    from .paths import data_dir, data_file

    try:
        key = str(data_dir(data_root).resolve())
        if key not in _difficulty_cache:
            ins = ae.load_eval_instructions(data_root)
            _difficulty_cache[key] = ae.estimate_difficulty(
                ae.load_compact(data_file("alpaca_eval/annotations_compact_dev.csv.gz", data_root), ins))
    except Exception:  # noqa: BLE001 - no data: no LC
        return None
    return _difficulty_cache[key]


NO_VERDICT = ("unparsed", "error")  # AlpacaJudge methods that carry no verdict (a 1.5 placeholder, not a draw)


def aggregate(records: Sequence[dict[str, Any]], lc_min_rows: int = LC_MIN_ROWS, data_root: str | None = None) -> list[Row]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["arch"], r["benchmark"])].append(r)
    rows = []
    for (arch, bench), recs in sorted(groups.items()):
        ok = [r for r in recs if not r.get("error")]
        # A pair the sweep could not run (an MMLU logprob benchmark on an ensemble): no score, said in the flags.
        skipped = [r for r in recs if r.get("skipped")]
        n = len(recs)
        common = dict(
            arch=arch, benchmark=bench, n=n,
            calls_per_q=float(np.mean([r.get("calls", 0) for r in recs])),
            prompt_tokens=int(sum(r.get("prompt_tokens", 0) for r in recs)),
            completion_tokens=int(sum(r.get("completion_tokens", 0) for r in recs)),
            sec_per_q=float(np.mean([r.get("seconds", 0.0) for r in recs])),
            errors=n - len(ok) - len(skipped),
            judge_calls=int(sum(r.get("judge_calls", 0) for r in recs)),
        )
        notes: dict[str, Any] = {}
        flags: list[str] = []
        if skipped:
            notes["skipped"] = len(skipped)
            flags.append(f"{len(skipped)} of {n} questions skipped (not run, not scored): {skipped[0]['skipped']}")
        if bench in ("alpaca_eval", "mt_bench", "arena_hard"):  # judged: a constant output must not pass unnoticed
            texts = [o for r in ok for o in ((r.get("output"),) if isinstance(r.get("output"), str) else (r.get("output") or ()))]
            of = ae.output_flags(texts)
            flags += of.pop("flags", [])
            notes.update(of)
        if bench == "alpaca_eval":
            methods = defaultdict(int)
            for r in ok:
                methods[r.get("judge_method", "?")] += 1
            notes["judge_methods"] = dict(methods)
            # A verdict the judge did not give is no draw: left out (as MT-Bench's unparsed ratings), and flagged.
            judged = [r for r in ok if r.get("judge_method") not in NO_VERDICT]
            if len(judged) < len(ok):
                flags.append(f"{len(ok) - len(judged)} of {len(ok)} judge verdicts unparsed or failed: left out of the win rate")
            prefs = [r.get("preference", 1.5) for r in judged] + [1.0 for r in recs if r.get("error")]  # a failed answer loses
            score = se = None
            unit = "win %"
            if prefs:
                wr = ae.win_rate(prefs)
                # one judged instruction has no standard error (win_rate's NaN): None, as every other row's
                score, se = wr.win_rate, (wr.standard_error if math.isfinite(wr.standard_error) else None)
            diff = _official_difficulty(data_root) if len(judged) >= lc_min_rows else None
            if diff is not None and score is not None:
                rows_j = [ae.Judged(r["instruction"], r["preference"], r["len_baseline"], r["len_model"]) for r in judged]
                lc = ae.length_controlled_win_rate(rows_j, diff)
                notes["lc_win_rate"] = round(lc.length_controlled_winrate, 2)
                notes["lc_se"] = round(lc.lc_standard_error, 2)
                flags += ae.lc_change_flags(score, lc.length_controlled_winrate)
            elif len(judged) < lc_min_rows:
                notes["lc_missing"] = f"needs >= {lc_min_rows} judged instructions, has {len(judged)}"
            else:
                notes["lc_missing"] = "no instruction difficulties (alpaca_eval/annotations_compact_dev.csv.gz in the data folder)"
            pb = ae.position_bias([r["preference"] for r in judged if "swapped" in r], [r["swapped"] for r in judged if "swapped" in r])
            flags += pb.pop("flags", [])
            if "position_bias" in pb:
                notes.update(position_bias=pb["position_bias"], position_bias_se=pb["position_bias_se"])
        elif bench == "mt_bench":
            # FastChat: the mean over every valid turn score (a question with one unparsed turn counts once)
            t1 = [r["turn_scores"][0] for r in ok if r.get("turn_scores") and r["turn_scores"][0] is not None]
            t2 = [r["turn_scores"][1] for r in ok if len(r.get("turn_scores") or ()) > 1 and r["turn_scores"][1] is not None]
            vals = t1 + t2
            n_turns = sum(len(r.get("turn_scores") or ()) for r in ok)
            if len(vals) < n_turns:
                flags.append(f"{n_turns - len(vals)} of {n_turns} turn ratings unparsed: left out (as FastChat)")
            score, se, unit = (float(np.mean(vals)) if vals else None), _sem(vals), "1-10"
            notes.update(turn1=round(float(np.mean(t1)), 3) if t1 else None, turn2=round(float(np.mean(t2)), 3) if t2 else None)
        elif bench == "arena_hard":
            games = [ArenaGame(r["id"], g["model_first"], g["verdict"]) for r in ok for g in r.get("games", [])]
            if (unparsed := sum(g.verdict is None for g in games)):
                flags.append(f"{unparsed} of {len(games)} games without a verdict: left out (as upstream)")
            # a failed question counts as two lost games
            games += [ArenaGame(r["id"], f, "B>>A" if f else "A>>B") for r in recs if r.get("error") for f in (False, True)]
            w = arena_win_rate(games)
            # no game with a verdict: no score and no interval ("–", not NaN and "ci95=(nan, nan)")
            score, unit = (w["win_rate"] if math.isfinite(w["win_rate"]) else None), "win %"
            se = None
            if score is not None:
                notes.update(ci95=(round(w["ci_low"], 2), round(w["ci_high"], 2)))
        elif bench.endswith("_logprob"):
            # MMLU logprob: a failed scoring call measured nothing (as a judge call that failed): left out, not a wrong
            # answer (flagged with the others' failures below).
            vals = [float(r.get("score") or 0.0) * 100 for r in ok]
            score, se, unit = (float(np.mean(vals)) if vals else None), _sem(vals), "acc %"
        else:
            vals = [float(r.get("score") or 0.0) * 100 for r in recs if not r.get("skipped")]
            score, se, unit = (float(np.mean(vals)) if vals else None), _sem(vals), "acc %"
            if any("pass_at" in r for r in recs):
                # pass@k: the mean over problems of the unbiased per-problem estimate (a failed problem counts 0)
                ks = sorted({k for r in recs for k in r.get("pass_at", {})}, key=int)
                for k in ks:
                    notes[f"pass@{k}"] = round(100 * float(np.mean([r.get("pass_at", {}).get(k, 0.0) for r in recs])), 2)
                notes["samples"] = max(int(r.get("n_samples", 1)) for r in recs)
                unit = "pass@1 %"
        if (failed := failure_flag(bench, recs)) is not None:
            flags.insert(1 if skipped else 0, failed)
            if not ok:  # every question that ran failed: nothing was measured
                score = se = None
        rows.append(Row(score=score, se=se, unit=unit, notes=notes, flags=flags, **common))
    return rows


# How a failed question (an error instead of an answer) counts, per benchmark; the rest (auto-graded): as wrong.
FAILED_COUNTS = {
    "alpaca_eval": ("questions", "counted as lost"),
    "arena_hard": ("questions", "counted as two lost games"),
    "mt_bench": ("questions", "left out of the score"),
}


def _fmt(x: float | None, nd: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown(rows: Sequence[Row], title: str = "Sweep results") -> str:
    lines = [f"# {title}", "", f"_generated {time.strftime('%Y-%m-%d %H:%M:%S')}_", "",
             "| architecture | benchmark | n | score | ± s.e. | unit | calls/q | tokens in | tokens out | s/q | errors | notes |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        notes = ", ".join(f"{k}={v}" for k, v in r.notes.items() if v is not None)
        lines.append(f"| {r.arch} | {r.benchmark} | {r.n} | {_fmt(r.score)} | {_fmt(r.se)} | {r.unit} | {r.calls_per_q:.1f} | "
                     f"{r.prompt_tokens} | {r.completion_tokens} | {r.sec_per_q:.2f} | {r.errors} | {notes} |")
    flagged = [r for r in rows if r.flags]
    if flagged:
        lines += ["", "## Flags", ""]
        lines += [f"- **{r.arch} / {r.benchmark}**: {'; '.join(r.flags)}" for r in flagged]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], path: str | Path) -> Path:
    """Score vs backend calls per question, one panel per benchmark, one point per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = sorted({r.benchmark for r in rows})
    archs = sorted({r.arch for r in rows})
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(archs)}  # one colour per architecture in every panel
    fig, axes = plt.subplots(1, max(1, len(benches)), figsize=(4.5 * max(1, len(benches)), 3.8), squeeze=False)
    for ax, b in zip(axes[0], benches):
        for r in (r for r in rows if r.benchmark == b and r.score is not None):
            ax.errorbar(r.calls_per_q, r.score, yerr=r.se or 0, fmt="o", capsize=3, color=colors[r.arch])
            ax.annotate(r.arch, (r.calls_per_q, r.score), textcoords="offset points", xytext=(4, 4), fontsize=8)
        unit = next((r.unit for r in rows if r.benchmark == b), "")
        ax.set_title(b)
        ax.set_xlabel("backend calls per question")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def export_alpaca_outputs(records: Sequence[dict[str, Any]], out_dir: str | Path, data_root: str | None = None) -> list[Path]:
    """``<out>/alpaca_eval/<arch>/model_outputs.json`` in AlpacaEval's format (instruction order)."""
    from . import datasets as ds

    if not any(r["benchmark"] == "alpaca_eval" for r in records):
        return []
    by_id = {it.id: it for it in ds.load_alpaca_eval(data_root)}
    paths = []
    archs = sorted({r["arch"] for r in records if r["benchmark"] == "alpaca_eval"})
    for a in archs:
        recs = sorted((r for r in records if r["benchmark"] == "alpaca_eval" and r["arch"] == a), key=lambda r: int(r["id"]))
        rows = [{"dataset": by_id[r["id"]].meta.get("dataset"), "instruction": by_id[r["id"]].prompt,
                 "output": r.get("output") or "", "generator": a} for r in recs]
        p = Path(out_dir) / "alpaca_eval" / a / "model_outputs.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
        paths.append(p)
    return paths


def export_fastchat_answers(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """``<out>/mt_bench/model_answer/<arch>.jsonl`` in FastChat's answer format."""
    import uuid

    paths = []
    archs = sorted({r["arch"] for r in records if r["benchmark"] == "mt_bench"})
    for a in archs:
        recs = sorted((r for r in records if r["benchmark"] == "mt_bench" and r["arch"] == a and r.get("output")), key=lambda r: int(r["id"]))
        p = Path(out_dir) / "mt_bench" / "model_answer" / f"{a}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", encoding="utf-8") as f:
            for r in recs:
                turns = r["output"] if isinstance(r["output"], list) else [r["output"]]
                f.write(json.dumps({"question_id": int(r["id"]), "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{a}/{r['id']}").hex,
                                    "model_id": a, "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()},
                                   ensure_ascii=False) + "\n")
        paths.append(p)
    return paths


def load_records(out_dir: str | Path) -> list[dict[str, Any]]:
    from .sweep import ResultsLog

    return ResultsLog(Path(out_dir) / "results.jsonl").records


def write_report(out_dir: str | Path, title: str | None = None, data_root: str | None = None) -> dict[str, Path | list[Path]]:
    """``data_root``: the benchmark data folder (--data) the AlpacaEval export and difficulties are read from."""
    out = Path(out_dir)
    records = load_records(out)
    rows = aggregate(records, data_root=data_root)
    md = out / "report.md"
    md.write_text(markdown(rows, title or f"Sweep results: {out.name}"), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(_finite([r.__dict__ for r in rows]), indent=2, default=str, allow_nan=False),
                                      encoding="utf-8")
    png = plot(rows, out / "score_vs_calls.png")
    return {"markdown": md, "plot": png, "alpaca": export_alpaca_outputs(records, out, data_root), "fastchat": export_fastchat_answers(records, out)}


def _finite(x: Any) -> Any:
    """``x`` with every NaN or infinity made None: ``summary.json`` is strict JSON (a bare ``NaN`` is no JSON value,
    and parsers other than Python's refuse the file)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def failure_flag(bench: str, recs: Sequence[dict[str, Any]]) -> str | None:
    """The flag of a row's failed questions (an error recorded: a backend down, a context overflow), one rule for every
    benchmark: ``N of M <what> failed: <how they count> (first: <error>)``; None when none failed.  How they count is
    the benchmark's own (a failed MMLU logprob scoring call is left out of the accuracy, a failed answer of an
    auto-graded benchmark is wrong, a judged one loses); when every question that ran failed the row has no score
    (``aggregate``: "–", not 0.00) -- a dead backend measured nothing."""
    ran = [r for r in recs if not r.get("skipped")]
    failed = [r for r in ran if r.get("error")]
    if not failed:
        return None
    what, how = FAILED_COUNTS.get(bench, ("questions", "counted as wrong"))
    if bench.endswith("_logprob"):
        what, how = "scoring calls", "left out of the accuracy"
    return f"{len(failed)} of {len(ran)} {what} failed: {how} (first: {str(failed[0]['error'])[:160]})"

