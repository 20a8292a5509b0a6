"""``python -m training.specdec build-data | merge-data | train-draft | train-head | bench`` (from a checkout)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``specdec`` and its subcommands to ``subparsers`` (for a host CLI that wants them)."""
    p = subparsers.add_parser("specdec", help="SpecDec++ speculative decoding: data, training, benchmark")
    add_commands(p)
    return p


def add_commands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="specdec_cmd", required=True)

    b = sub.add_parser("build-data", help="teacher-force the target on AlpacaEval train answers (features, labels)")
    b.add_argument("--work", type=Path, default=None)
    b.add_argument("--n-prompts", type=int, default=640, help="train instructions per system")
    b.add_argument("--max-new", type=int, default=192, help="answer tokens kept (or generated) per instruction")
    b.add_argument("--source", choices=["corpus", "gpt4", "target"], default="corpus",
                   help="corpus: several AlpacaEval systems' answers; gpt4: the reference only; target: its own greedy answers")
    b.add_argument("--systems", type=int, default=10, help="how many AlpacaEval systems the corpus takes")
    b.add_argument("--name", default="data", help="writes <work>/<name>.pt (training reads data.pt)")
    b.add_argument("--prompt-sets", default="alpaca_train",
                   help="source=target: comma list of alpaca_train, arena_hard, mt_bench")
    b.add_argument("--samples", type=int, default=0, help="source=target: sampled answers per prompt besides the greedy one")
    b.add_argument("--temperature", type=float, default=0.7, help="temperature of those samples")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--gen-batch", type=int, default=16, help="rows generated together")
    b.add_argument("--tf-batch", type=int, default=1, help="sequences teacher-forced together (GPU: 64)")
    b.set_defaults(func=_build_data)

    m = sub.add_parser("merge-data", help="concatenate <work>/<part>.pt files into <work>/data.pt")
    m.add_argument("parts", nargs="+")
    m.add_argument("--work", type=Path, default=None)
    m.set_defaults(func=_merge_data)

    d = sub.add_parser("train-draft", help="train the EAGLE draft layer")
    d.add_argument("--work", type=Path, default=None)
    d.add_argument("--out", type=Path, default=None)
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--vocab", type=int, default=8192)
    d.add_argument("--max-minutes", type=float, default=60.0)
    d.add_argument("--unroll", type=float, default=0.5, help="weight of the second-step loss (0: EAGLE-1 training)")
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument("--batch", type=int, default=8, help="sequences per step (GPU: 64)")
    d.set_defaults(func=_train_draft)

    h = sub.add_parser("train-head", help="train the SpecDec++ acceptance head (and the draft first if missing)")
    h.add_argument("--work", type=Path, default=None)
    h.add_argument("--draft", type=Path, default=None)
    h.add_argument("--out", type=Path, default=None)
    h.add_argument("--mode", choices=["greedy", "sampled"], default="greedy")
    h.add_argument("--temperature", type=float, default=None, help="default: 0 for greedy, 1 for sampled")
    h.add_argument("--blocks", type=int, default=3)
    h.add_argument("--tied", action="store_true", help="reuse one block n times (the authors' code)")
    h.add_argument("--epochs", type=int, default=8)
    h.add_argument("--heldout-only", action="store_true",
                   help="train only on the draft's held-out text (unbiased labels, ~13x less data)")
    h.add_argument("--device", default="cpu", help="cpu or cuda")
    h.add_argument("--batch", type=int, default=256, help="positions per step (GPU: 2048)")
    h.add_argument("--max-train-seqs", type=int, default=None, help="cap on training sequences (an even spread)")
    h.add_argument("--select", choices=["brier", "auc", "loss"], default="brier", help="held-out metric that picks the kept epoch")
    h.add_argument("--reads", choices=["candidate", "proposer"], default="candidate",
                   help="the draft state that judges a candidate: the step whose input it is (the authors'), "
                        "or the step that proposed it (no extra draft step when serving)")
    h.set_defaults(func=_train_head)

    r = sub.add_parser("bench", help="policy x threshold sweep; prints tables, writes JSON + Pareto PNG")
    add_bench_args(r)
    r.set_defaults(func=_bench)


def _work(args: argparse.Namespace) -> Path:
    from .train import DEFAULT_WORK

    return args.work or DEFAULT_WORK


def _build_data(args: argparse.Namespace) -> int:
    from .train import build_data

    build_data(_work(args), n_prompts=args.n_prompts, max_new=args.max_new, source=args.source, systems=args.systems,
               name=args.name, device=args.device, prompt_sets=tuple(x for x in args.prompt_sets.split(",") if x),
               samples=args.samples, temperature=args.temperature, gen_batch=args.gen_batch, tf_batch=args.tf_batch)
    return 0


def _merge_data(args: argparse.Namespace) -> int:
    from .train import merge_data

    merge_data(_work(args), args.parts)
    return 0


def _train_draft(args: argparse.Namespace) -> int:
    from .train import train_draft

    train_draft(_work(args), args.out, epochs=args.epochs, vocab=args.vocab, max_minutes=args.max_minutes,
                w_unroll=args.unroll, device=args.device, batch=args.batch)
    return 0


def _train_head(args: argparse.Namespace) -> int:
    from archon_server.engine.specdec.loading import ARTIFACTS
    from .train import train_draft, train_head

    draft = args.draft or ARTIFACTS / "draft"
    if not (Path(draft) / "draft.json").exists():
        train_draft(_work(args), Path(draft), device=args.device)
    temp = args.temperature if args.temperature is not None else (0.0 if args.mode == "greedy" else 1.0)
    train_head(_work(args), Path(draft), args.out, mode=args.mode, temperature=temp, blocks=args.blocks,
               tied=args.tied, epochs=args.epochs, heldout_only=args.heldout_only, device=args.device, batch=args.batch,
               max_train_seqs=args.max_train_seqs, select=args.select, reads=args.reads)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench_from_args

    bench_from_args(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.specdec", description=__doc__)
    add_commands(ap)
    args = ap.parse_args(argv)
    return args.func(args)



def add_bench_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--n-alpaca", type=int, default=8)
    ap.add_argument("--n-ood", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--verify-mode", default="greedy", choices=["greedy", "sampled", "point_mass"])
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--out", default="benchmarks/results/specdec")
    ap.add_argument("--configs", default="", help="comma list like 'fixed:4,specdec_pp:0.5,cumprob:0.7:3:1,specdec_pp/proposer:0.5' (method[/head]:threshold[:max K[:min K]]; "
                    "head: candidate (the authors', default) or proposer; default: full sweep)")
    ap.add_argument("--ood-configs", default="", help="labels to run on OOD sets (default: all)")
    ap.add_argument("--drafter", default="eagle", choices=["eagle", "ngram"], help="ngram = prompt lookup (no model)")
    ap.add_argument("--dtype", default="auto", help="target dtype: auto = as served (bf16 + int8 small-batch "
                    "weights on AVX512-BF16 CPUs), float32")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (a GPU when there is one)")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
