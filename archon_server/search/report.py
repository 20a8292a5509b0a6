"""Results of a study: the best architecture as a YAML file and a markdown report with plots.

Everything is read back from the study (trial user attributes and study user
attributes written by the runner), so ``search export`` works from the storage URL
alone, on any machine, while workers are still running.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from archon_server.search.objective import (
    ATTR_COST,
    ATTR_DEV_SCORE,
    ATTR_DUPLICATE,
    ATTR_PRUNED,
    ATTR_REJECTED,
)
from archon_server.search.runner import STUDY_BASELINES, STUDY_CONFIG, STUDY_TEST, progress, ranked_trials, trial_spec
from archon_server.spec import ArchitectureSpec, dump_architecture, load_architecture


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    trials = ranked_trials(study)
    if not trials:
        raise LookupError(f"study {study.study_name!r} has no complete trial yet")
    return trials[0]


def export_best(study: optuna.Study, out_dir: str | Path = "architectures", name: str | None = None) -> tuple[Path, ArchitectureSpec]:
    """Write the best trial's architecture to ``<out_dir>/<name>.yaml``; it round-trips through ``load_architecture``."""
    t = best_trial(study)
    name = name or f"{study.study_name}-best"
    spec = trial_spec(t, name=name)
    dev = t.user_attrs.get(ATTR_DEV_SCORE)
    test = study.user_attrs.get(STUDY_TEST, {}).get(str(t.number))
    desc = f"archon search: study {study.study_name}, trial {t.number}"
    if dev is not None:
        desc += f", dev score {dev:.4f}"
    if test:
        desc += f", test score {test['score']:.4f} (n={test['n']})"
    spec = spec.model_copy(update={"description": desc})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    path.write_text(dump_architecture(spec), encoding="utf-8")
    load_architecture(path)  # fail here, not in the server, if the file does not load back
    return path, spec


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def plot_history(study: optuna.Study, path: Path) -> Path:
    """Objective (scalar) or dev score (pareto) per trial, with the running best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multi = len(study.directions) > 1
    xs, ys = [], []
    for t in _complete(study):
        xs.append(t.number)
        ys.append(t.values[0])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(xs, ys, s=14, label="complete trial")
    pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.intermediate_values]
    if pruned:
        ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                   s=10, marker="x", color="grey", label="pruned (last subset value)")
    best, run = [], float("-inf")
    for y in ys:
        run = max(run, y)
        best.append(run)
    ax.step(xs, best, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("dev score" if multi else "objective (dev score - lambda * cost)")
    ax.set_title(f"{study.study_name}: optimisation history")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """Non-dominated (cost, score, tag) points: lower cost and higher score are better. Sorted by cost."""
    front = []
    best = float("-inf")
    for c, s, tag in sorted(points, key=lambda p: (p[0], -p[1])):
        if s > best:
            front.append((c, s, tag))
            best = s
    return front


def plot_pareto(study: optuna.Study, path: Path, baselines: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(t.user_attrs[ATTR_COST], t.user_attrs[ATTR_DEV_SCORE], t.number) for t in _complete(study) if ATTR_COST in t.user_attrs]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.5, label="trials")
    ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color="C3", label="Pareto front")
    for name, row in baselines.items():
        if "dev" in row:
            ax.scatter([row["dev"]["cost"]], [row["dev"]["score"]], marker="*", s=120, label=f"baseline: {name}")
    ax.set_xlabel("cost per query")
    ax.set_ylabel("dev score")
    ax.set_title(f"{study.study_name}: score vs cost")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class ReportPaths:
    markdown: Path
    history_png: Path
    pareto_png: Path


def write_report(study: optuna.Study, out_dir: str | Path, storage_url: str | None = None) -> ReportPaths:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = study.user_attrs.get(STUDY_CONFIG, {})
    obj = cfg.get("objective", {})
    baselines = study.user_attrs.get(STUDY_BASELINES, {})
    tests = study.user_attrs.get(STUDY_TEST, {})
    hist = plot_history(study, out / "history.png")
    par = plot_pareto(study, out / "pareto.png", baselines)
    p = progress(study)
    all_trials = study.get_trials(deepcopy=False)
    rejected = [t for t in all_trials if ATTR_REJECTED in t.user_attrs]
    pruned = [t for t in all_trials if ATTR_PRUNED in t.user_attrs]
    dups = [t for t in all_trials if ATTR_DUPLICATE in t.user_attrs]
    lines = [
        f"# Architecture search: `{study.study_name}`",
        "",
        f"- objective: {obj.get('mode', '?')}, cost = {obj.get('cost', '?')} per query, lambda = {obj.get('lambda', obj.get('lam', '?'))}",
        f"- trials: {p.evaluated} evaluated ({len(pruned)} pruned early, {len(dups)} duplicates reused), "
        f"{p.rejected} rejected by rules/budget before any call, {p.failed} failed, "
        f"{p.retried} retried (their worker died), {p.surplus} surplus",
        f"- storage: `{storage_url}` (open it with `optuna-dashboard {storage_url}`)" if storage_url else "- storage: in memory",
        "",
        "## Best architectures (dev), held-out test",
        "",
        "| trial | objective | dev score | cost/query | test score | test cost | architecture |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in ranked_trials(study)[:10]:
        tr = tests.get(str(t.number))
        shape = ", ".join(f"{k}={v}" for k, v in t.params.items())
        lines.append(
            f"| {t.number} | {', '.join(f'{v:.4f}' for v in t.values)} | {t.user_attrs.get(ATTR_DEV_SCORE, float('nan')):.4f} | {t.user_attrs.get(ATTR_COST, float('nan')):.1f} | "
            + (f"{tr['score']:.4f} | {tr['cost']:.1f}" if tr else "- | -") + f" | {shape} |"
        )
    lines += ["", "## Baselines (same splits)", "", "| baseline | dev score | dev cost | test score | test cost |", "|---|---:|---:|---:|---:|"]
    for name, row in baselines.items():
        d, te = row.get("dev", {}), row.get("test", {})
        lines.append(f"| {name} | {d.get('score', float('nan')):.4f} | {d.get('cost', float('nan')):.1f} | "
                     f"{te.get('score', float('nan')):.4f} | {te.get('cost', float('nan')):.1f} |")
    if not baselines:
        lines.append("| (not evaluated) | | | | |")
    pts = [(t.user_attrs[ATTR_COST], t.user_attrs[ATTR_DEV_SCORE], t.number) for t in _complete(study) if ATTR_COST in t.user_attrs]
    lines += ["", "## Pareto front (dev score vs cost per query)", "", "| trial | cost/query | dev score |", "|---:|---:|---:|"]
    lines += [f"| {n} | {c:.1f} | {s:.4f} |" for c, s, n in pareto_front(pts)]
    if rejected:
        lines += ["", "## Rejected before evaluation (first 10)", ""]
        lines += [f"- trial {t.number}: {t.user_attrs[ATTR_REJECTED]}" for t in rejected[:10]]
    lines += ["", f"![history]({hist.name})", "", f"![pareto]({par.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return ReportPaths(md, hist, par)
