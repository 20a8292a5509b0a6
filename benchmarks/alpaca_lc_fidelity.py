"""AlpacaEval LC fidelity on the shipped annotations: ours vs the official leaderboard, before/after.

    python benchmarks/alpaca_lc_fidelity.py [--data ../shared/data]

For the 20 systems of ``annotations_compact_dev.csv.gz``: raw win rate, LC without regularisation
("before", upstream's unregularised variant), LC with the slope prior ("after", bench.alpaca_eval.
SlopePrior), the leaderboard's LC, and our θ_len against upstream's fitted one (shipped glm_weights).
Systems are split by a fixed hash into dev (12) and held-out (8); nothing in the slope prior is fitted
to either (its centre and weight come from the weights file and upstream's constants), the split
only keeps the held-out numbers an independent check.  Difficulties are estimated jointly from the
same 20 systems (in-sample for each scored system, see README on the LC standard error).
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np

from archon_server.bench import alpaca_eval as ae
from archon_server.bench.paths import data_file

HELD_OUT = 8


def split(names: list[str]) -> tuple[list[str], list[str]]:
    ranked = sorted(names, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    held = sorted(ranked[:HELD_OUT])
    return [s for s in sorted(names) if s not in held], held


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    args = ap.parse_args()
    ins = ae.load_eval_instructions(args.data)
    systems = ae.load_compact(data_file("alpaca_eval/annotations_compact_dev.csv.gz", args.data), ins)
    lb = ae.load_leaderboard(data_file("alpaca_eval/leaderboard_alpaca_eval2_weighted_alpaca_eval_gpt4_turbo.csv", args.data))
    weights = ae.load_glm_weights(data_file(ae.GLM_WEIGHTS, args.data))
    prior = ae.slope_prior_from_weights(weights)
    diff = ae.estimate_difficulty(systems)
    before = {s: ae.length_controlled_win_rate(r, diff, slope_prior=None) for s, r in systems.items()}
    after = {s: ae.length_controlled_win_rate(r, diff, slope_prior=prior) for s, r in systems.items()}
    dev, held = split(list(systems))
    print(f"slope prior: centre {prior.center:.4f} (mean θ_len of {', '.join(ae.GAMED_BASELINES)}), weight {prior.weight:g}")
    print(f"{'system':32s} {'split':5s} {'raw':>6s} {'before':>7s} {'after':>7s} {'lb_LC':>6s} {'Δafter':>7s} "
          f"{'θlen':>6s} {'up θlen':>7s} {'lc_se':>6s} {'lb_se':>6s}")
    for s in sorted(systems):
        L, a, b = lb[s], after[s], before[s]
        lse = L.get("lc_standard_error")
        print(f"{s:32s} {'held' if s in held else 'dev':5s} {a.win_rate:6.2f} {b.length_controlled_winrate:7.2f} "
              f"{a.length_controlled_winrate:7.2f} {L['length_controlled_winrate']:6.2f} "
              f"{a.length_controlled_winrate - L['length_controlled_winrate']:+7.2f} {a.theta_len:+6.2f} "
              f"{weights[s][0]:+7.2f} {a.lc_standard_error:6.2f} {lse if lse is not None else float('nan'):6.2f}")
    for name, ss in (("dev", dev), ("held-out", held), ("all", sorted(systems))):
        want = [lb[s]["length_controlled_winrate"] for s in ss]
        for tag, res in (("before", before), ("after", after)):
            got = [res[s].length_controlled_winrate for s in ss]
            err = np.abs(np.array(got) - np.array(want))
            dth = np.mean([abs(res[s].theta_len - weights[s][0]) for s in ss])
            print(f"{name:8s} {tag:6s} n={len(ss):2d}  MAE {err.mean():.2f}  max {err.max():.2f}  Spearman {ae.spearman(got, want):.3f}  "
                  f"mean |θ_len − upstream| {dth:.2f}")
    gamed = [s for s in sorted(systems) if s.endswith(("_verbose", "_concise"))]
    print("length-gamed variants (after):", ", ".join(
        f"{s} {after[s].length_controlled_winrate - lb[s]['length_controlled_winrate']:+.2f}" for s in gamed))
    se = [(after[s].lc_standard_error, lb[s]["lc_standard_error"]) for s in sorted(systems) if lb[s].get("lc_standard_error")]
    if se:
        print(f"LC s.e. ours / leaderboard over {len(se)} systems with one: {np.mean([a / b for a, b in se]):.2f}x")


if __name__ == "__main__":
    main()
