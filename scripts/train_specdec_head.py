#!/usr/bin/env python
"""Reproduce the shipped SpecDec++ artifacts (draft + heads).

    python scripts/train_specdec_head.py            # CPU recipe (~3 hours on 2 cores)
    python scripts/train_specdec_head.py --skip-data --skip-draft   # heads only
    python scripts/train_specdec_head.py --gpu      # GPU recipe (a few minutes on one H100)

CPU recipe, two stages.  1: the target (bf16, as served) teacher-forced on ten AlpacaEval
systems' answers to the train instructions (~1.1M tokens) plus its own greedy answers to 400
of them; the draft trains 4 epochs from the target's last layer.  2 (self-distillation): the
target's own greedy answers (192 tokens) to the AlpacaEval train instructions, the arena-hard
prompts and the MT-Bench first turns (1801 prompts, ~0.49M tokens, ~19 min to generate and
teacher-force here); the stage-1 draft trains 4 more epochs on them at lr 3e-4, and the heads
(the authors' form and the proposer form, greedy and sampled; ~8 minutes each) train on them.
Held-out top-1 agreement on the target's own text: 0.344 -> 0.396.
GPU recipe: the same corpus plus the target's own answers (one greedy, ``--samples``
sampled at T=0.7) to every AlpacaEval train instruction, the arena-hard prompts and the
MT-Bench first turns - generation, which is what makes self-distillation expensive on a
CPU, takes about a minute there.  Every 10th prompt is held out for validation and for
the heads in both.  ``--compare DIR`` reports an existing draft's held-out agreement on
the same validation set, so two drafts are compared on equal terms.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's offline tooling (training/)

from archon_server.engine.specdec.draft import EagleDraft  # noqa: E402
from archon_server.engine.specdec.loading import ARTIFACTS  # noqa: E402
from training.specdec.train import (  # noqa: E402
    DEFAULT_WORK, build_data, draft_eval, log, merge_data, split_by_group, target_state_dict, train_draft, train_head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=ARTIFACTS, help="writes draft/, head_{greedy,sampled}[_proposer]/ here")
    ap.add_argument("--gpu", action="store_true", help="the GPU recipe (device cuda, self-distillation on more prompts)")
    ap.add_argument("--systems", type=int, default=10)
    ap.add_argument("--target-prompts", type=int, default=None, help="per prompt set (CPU: 400, GPU: all)")
    ap.add_argument("--samples", type=int, default=3, help="GPU recipe: sampled answers per prompt")
    ap.add_argument("--draft-epochs", type=int, default=None, help="CPU: 4, GPU: 10")
    ap.add_argument("--max-minutes", type=float, default=90.0, help="draft training time budget")
    ap.add_argument("--head-seqs", type=int, default=None, help="cap on head training sequences (GPU: 6000)")
    ap.add_argument("--compare", type=Path, default=None, help="an existing draft to evaluate on the same held-out set")
    ap.add_argument("--skip-data", action="store_true")
    ap.add_argument("--skip-draft", action="store_true")
    ap.add_argument("--skip-heads", action="store_true")
    ap.add_argument("--skip-stage2", action="store_true", help="CPU recipe: stop after stage 1")
    args = ap.parse_args()
    dev = "cuda" if args.gpu else "cpu"
    gpu = {"device": dev, "gen_batch": 256, "tf_batch": 64} if args.gpu else {}
    if not args.skip_data:
        build_data(args.work, n_prompts=640, max_new=192, systems=args.systems, name="corpus", **gpu)
        if args.gpu:
            build_data(args.work, n_prompts=args.target_prompts or 10_000, max_new=192, source="target", name="target",
                       prompt_sets=("alpaca_train", "arena_hard", "mt_bench"), samples=args.samples,
                       max_prompt=512, **gpu)
        else:
            build_data(args.work, n_prompts=args.target_prompts or 400, max_new=160, source="target", name="target")
        merge_data(args.work, ["corpus", "target"])
    draft_dir = args.out / "draft"
    if not args.skip_draft:
        train_draft(args.work, draft_dir, epochs=args.draft_epochs or (10 if args.gpu else 4),
                    max_minutes=args.max_minutes, device=dev, batch=64 if args.gpu else 8)
    head_work = args.work
    if not args.gpu and not args.skip_stage2:
        head_work = args.work / "self_distill"
        if not args.skip_data:
            build_data(head_work, n_prompts=10_000, max_new=192, source="target", name="target",
                       prompt_sets=("alpaca_train", "arena_hard", "mt_bench"), max_prompt=512, gen_batch=32)
            merge_data(head_work, ["target"])
        if not args.skip_draft:
            train_draft(head_work, draft_dir, epochs=4, lr=3e-4, resume=draft_dir, max_minutes=args.max_minutes)
    if args.compare:
        blob = torch.load(args.work / "data.pt")
        val, _ = split_by_group(blob["seqs"])
        embed = target_state_dict(blob["target"])["model.embed_tokens.weight"].float()
        result = {str(d): draft_eval(EagleDraft.load(d, embed).to(dev), val) for d in (args.compare, draft_dir)}
        log(f"held-out agreement on the same {len(val)} sequences: {json.dumps(result)}")
        (args.out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.skip_heads:
        return
    head = {"device": dev, "batch": 2048 if args.gpu else 256, "max_train_seqs": args.head_seqs or (6000 if args.gpu else None)}
    for reads in ("candidate", "proposer"):  # the authors' head, and ours that needs no extra draft step
        suffix = "" if reads == "candidate" else f"_{reads}"
        train_head(head_work, draft_dir, args.out / f"head_greedy{suffix}", mode="greedy", temperature=0.0,
                   reads=reads, **head)
        train_head(head_work, draft_dir, args.out / f"head_sampled{suffix}", mode="sampled", temperature=1.0,
                   reads=reads, **head)


if __name__ == "__main__":
    main()
