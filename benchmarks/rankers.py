"""Which ranker is worth its cost: agreement with AlpacaEval's official judge, best-of-n on MATH-500.

    python benchmarks/rankers.py [--pairs 16] [--math 8] [--samples 4] [--config server.yaml] [--out FILE]

Part 1, **AlpacaEval pairs**: instructions where the official judge (weighted_alpaca_eval_gpt4_turbo) compared
an annotated system's output with the GPT-4-Turbo baseline (draws left out); every ranker picks one of the two
(shown in a seeded random order), and we report how often it picks the judge's preferred one, with the calls,
tokens and wall time it spent per pair.  Part 2, **MATH-500 best-of-n**: ``--samples`` samples of the ``default``
model per problem (one n=k request, levels 1-2 so a small model solves some); each ranker picks one, against
majority vote over the last ``\\boxed{}``, the first sample alone and the oracle (any sample right).

Every ranker is the server's own component, run exactly as an architecture runs it (same prompts, same
calls): ``listwise`` (the ``ranker`` component, a generated ``[2] > [1]``), ``pairwise`` (scorer: logprob
judge, both orders), ``pointwise`` (scorer: expected 1-10 rating), ``cdr`` / ``cdr_norm`` (scorer: density
ratio of ``default`` over ``weak``, raw / per token) and ``random``.  Aliases: ``judge`` (judges),
``default`` (generator, CDR's strong model), ``weak`` (CDR's base model).  With no ``--config`` they are
the default server's (SmolLM2-135M-Instruct; gemma3-270m base as ``weak``); with one, the same table runs on
real backends unchanged.  Texts longer than ``--max-chars`` are cut (for every ranker alike).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archon_server.backends.base import Usage
from archon_server.backends.registry import BackendRegistry, build_registry
from archon_server.bench.alpaca_eval import normalize_preference
from archon_server.bench.datasets import load_math500
from archon_server.bench.grading import grade_math
from archon_server.bench.paths import data_file
from archon_server.components import COMPONENTS, ComponentContext
from archon_server.components.extractors import extract
from archon_server.components.state import Candidate, State
from archon_server.components.trace import LayerTrace
from archon_server.components.vote import majority
from archon_server.config import default_config, load_config
from archon_server.spec import ExtractorSpec, Sampling, parse_architecture

RANKERS: dict[str, dict[str, Any] | None] = {
    "listwise": {"type": "ranker", "model": "judge", "top_k": 1},
    "pairwise": {"type": "scorer", "method": "pairwise", "model": "judge", "top_k": 1},
    "pointwise": {"type": "scorer", "method": "logprob_judge", "model": "judge", "top_k": 1},
    "cdr": {"type": "scorer", "method": "density_ratio", "model": "default", "weak": "weak", "top_k": 1},
    "cdr_norm": {"type": "scorer", "method": "density_ratio", "model": "default", "weak": "weak", "top_k": 1, "length_normalize": True},
    "random": None,
}
ANNOTATED = ["alpaca-7b", "claude-2.1", "gpt-3.5-turbo-1106", "gpt-3.5-turbo-1106_concise", "gpt-3.5-turbo-1106_verbose",
             "FuseChat-Gemma-2-9B-Instruct", "FuseChat-Llama-3.2-1B-Instruct"]


def component(cfg: dict[str, Any]) -> Any:
    """The ranker as an architecture would build it (validated by the same spec)."""
    spec = parse_architecture({"name": "bench", "layers": [[{"type": "generator", "model": "default"}], [cfg]]}).layers[1][0]
    return COMPONENTS[spec.type](spec, 0)


async def pick(registry: BackendRegistry, name: str, messages: list[dict[str, Any]], texts: list[str], rng: random.Random) -> dict[str, Any]:
    """Index the ranker chose among ``texts``, and what choosing cost."""
    t0 = time.perf_counter()
    cfg = RANKERS[name]
    if cfg is None:
        return {"choice": rng.randrange(len(texts)), "calls": 0, "tokens": 0, "wall_s": 0.0, "failed": False}
    comp = component(cfg)
    layer = LayerTrace(1, [comp.id])
    usage = Usage()
    ctx = ComponentContext(registry, layer, usage, Sampling(), component=comp.id, ctype=comp.type)
    state = State(messages=messages, candidates=[Candidate(t, source="bench", meta={"i": i}) for i, t in enumerate(texts)])
    try:
        upd = await comp.run(ctx, state)
        kept = upd.selected or []
        best = max(kept, key=lambda c: c.score if c.score is not None else float("-inf"))
        choice, failed = int(best.meta["i"]), bool(layer.failures) or any("unparseable" in n for n in layer.notes)
    except Exception as e:  # noqa: BLE001 - a ranker that fails counts as a failure (and picks the first), never kills the run
        print(f"  {name} failed: {type(e).__name__}: {e}"[:300], file=sys.stderr)
        choice, failed = 0, True
    return {"choice": choice, "calls": sum(c.requests for c in layer.calls), "tokens": usage.total_tokens,
            "wall_s": time.perf_counter() - t0, "failed": failed}


def alpaca_pairs(n: int, seed: int, min_margin: float) -> list[dict[str, Any]]:
    """Seeded sample of judged pairs (baseline vs system), the judge's preference at least ``min_margin`` from a draw."""
    rows = []
    for model in ANNOTATED:
        path = data_file(f"alpaca_eval/annotations_weighted_alpaca_eval_gpt4_turbo/{model}.json")
        with open(path, encoding="utf-8") as f:
            for r in json.load(f):
                p = normalize_preference(r.get("preference"))
                if abs(p - 1.5) >= min_margin and r.get("output_1") and r.get("output_2"):
                    rows.append({"instruction": r["instruction"], "baseline": r["output_1"], "system": r["output_2"],
                                 "generator": model, "preference": p})
    rng = random.Random(seed)
    rng.shuffle(rows)
    return rows[:n]


def summarize(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    walls = [r["wall_s"] for r in rows]
    return {
        key: sum(r[key] for r in rows) / max(1, len(rows)),
        "calls": statistics.mean(r["calls"] for r in rows) if rows else 0,
        "tokens": statistics.mean(r["tokens"] for r in rows) if rows else 0,
        "wall_s_median": statistics.median(walls) if walls else 0.0,
        "wall_s_range": [min(walls), max(walls)] if walls else [0.0, 0.0],
        "failed": sum(r["failed"] for r in rows),
        "n": len(rows),
    }


async def part_alpaca(registry: BackendRegistry, args: argparse.Namespace) -> dict[str, Any]:
    pairs = alpaca_pairs(args.pairs, args.seed, args.min_margin)
    order_rng = random.Random(args.seed + 1)
    per: dict[str, list[dict[str, Any]]] = {k: [] for k in RANKERS}
    for i, p in enumerate(pairs):
        swap = order_rng.random() < 0.5  # which output is shown first
        texts = [p["baseline"][: args.max_chars], p["system"][: args.max_chars]]
        if swap:
            texts.reverse()
        winner = int(p["preference"] > 1.5) ^ int(swap)  # index in `texts` of the judge's preferred output
        msgs = [{"role": "user", "content": p["instruction"]}]
        for name in RANKERS:
            r = await pick(registry, name, msgs, texts, random.Random(f"{args.seed}:{i}:{name}"))
            r["agree"] = float(r["choice"] == winner)
            per[name].append(r)
        print(f"  pair {i + 1}/{len(pairs)} ({p['generator']}): " + " ".join(f"{k}={'+' if v[-1]['agree'] else '-'}" for k, v in per.items()),
              file=sys.stderr, flush=True)
    return {name: summarize(rows, "agree") for name, rows in per.items()}


async def part_math(registry: BackendRegistry, args: argparse.Namespace) -> dict[str, Any]:
    items = [it for it in load_math500() if int(it.meta["level"]) <= 2]
    random.Random(args.seed).shuffle(items)
    items = items[: args.math]
    gen_layer = LayerTrace(0, ["generator"])
    gen_ctx = ComponentContext(registry, gen_layer, Usage(), Sampling(), component="samples", ctype="generator")
    per: dict[str, list[dict[str, Any]]] = {k: [] for k in [*RANKERS, "majority", "first", "oracle"]}
    boxed = ExtractorSpec(kind="boxed")
    for n, it in enumerate(items):
        msgs = it.messages()
        params = gen_ctx.sampling(Sampling(temperature=0.7, max_tokens=args.max_tokens, seed=args.seed + n))
        res = await gen_ctx.call("default", msgs, params, n=args.samples, purpose="samples")
        texts = [c.text for c in res.choices]
        right = [grade_math(t, it.reference).correct for t in texts]
        for name in RANKERS:
            r = await pick(registry, name, msgs, [t[: args.max_chars] for t in texts], random.Random(f"{args.seed}:{n}:{name}"))
            r["acc"] = float(right[r["choice"]])
            per[name].append(r)
        answers = [extract(t, boxed) for t in texts]
        win = majority(answers)
        maj = answers.index(win) if win is not None else 0
        free = {"calls": 0, "tokens": 0, "wall_s": 0.0, "failed": False}
        per["majority"].append({**free, "acc": float(right[maj])})
        per["first"].append({**free, "acc": float(right[0])})
        per["oracle"].append({**free, "acc": float(any(right))})
        print(f"  problem {n + 1}/{len(items)}: {sum(right)}/{len(texts)} samples right", file=sys.stderr, flush=True)
    return {name: summarize(rows, "acc") for name, rows in per.items()}


def table(title: str, res: dict[str, Any], key: str) -> str:
    lines = [title, f"{'ranker':<11} {key:>6} {'calls':>6} {'tokens':>8} {'wall s (median, range)':>24} {'failed':>6}"]
    for name, r in res.items():
        lo, hi = r["wall_s_range"]
        lines.append(f"{name:<11} {r[key]:>6.3f} {r['calls']:>6.1f} {r['tokens']:>8.0f} {r['wall_s_median']:>9.2f} ({lo:.2f}-{hi:.2f}){'':>3} {r['failed']:>6}")
    return "\n".join(lines)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--math", type=int, default=8, help="MATH-500 problems (levels 1-2)")
    ap.add_argument("--samples", type=int, default=4, help="samples per MATH problem")
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--max-chars", type=int, default=1500, help="cut candidate texts to this many characters")
    ap.add_argument("--min-margin", type=float, default=0.2, help="leave out pairs the judge found this close to a draw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", help="server config whose aliases default/judge/weak the rankers use")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "rankers.json"))
    args = ap.parse_args()
    cfg = load_config(args.config) if args.config else default_config()
    registry = build_registry(cfg)
    await registry.start()
    try:
        await run(registry, args)
    finally:
        await registry.close()


async def run(registry: BackendRegistry, args: argparse.Namespace) -> None:
    warm = [{"role": "user", "content": "Say hi."}]
    for name in RANKERS:  # load lazy models (the base model) and warm caches outside the timings
        await pick(registry, name, warm, ["Hi!", "Hello."], random.Random(0))
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    out: dict[str, Any] = {"args": vars(args), "loadavg_start": load0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.pairs:  # each part is printed and saved as it completes
        out["alpaca_eval_pairs"] = await part_alpaca(registry, args)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(table(f"AlpacaEval pairs: agreement with the official judge ({args.pairs} pairs, draws within {args.min_margin} left out)",
                    out["alpaca_eval_pairs"], "agree"), flush=True)
    if args.math:
        out["math500_best_of_n"] = await part_math(registry, args)
        print(table(f"\nMATH-500 (levels 1-2) best-of-{args.samples}: accuracy of the pick ({args.math} problems); calls/tokens are the ranker's",
                    out["math500_best_of_n"], "acc"), flush=True)
    load1 = os.getloadavg()
    out.update(loadavg_end=load1, wall_s=time.perf_counter() - t0)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nload average {load0[0]:.1f} at start, {load1[0]:.1f} at end; {out['wall_s']:.0f} s in all; written to {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
