#!/usr/bin/env python
"""Reproduce the shipped SpecDec++ artifacts (draft + heads) on CPU (~1 hour on 2 cores).

    python scripts/train_specdec_head.py            # build data, train draft, both heads
    python scripts/train_specdec_head.py --skip-data --skip-draft   # heads only

Data: the target (bf16, as served) teacher-forced on ten AlpacaEval systems' answers to
the train instructions (~1.4M tokens) plus its own greedy answers to 400 of them; every
10th instruction is held out for validation and for the heads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from archon_server.engine.specdec.loading import ARTIFACTS
from archon_server.engine.specdec.train import DEFAULT_WORK, build_data, merge_data, train_draft, train_head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--systems", type=int, default=10)
    ap.add_argument("--target-prompts", type=int, default=400)
    ap.add_argument("--draft-epochs", type=int, default=4)
    ap.add_argument("--skip-data", action="store_true")
    ap.add_argument("--skip-draft", action="store_true")
    args = ap.parse_args()
    if not args.skip_data:
        build_data(args.work, n_prompts=640, max_new=192, systems=args.systems, name="corpus")
        build_data(args.work, n_prompts=args.target_prompts, max_new=160, source="target", name="target")
        merge_data(args.work, ["corpus", "target"])
    if not args.skip_draft:
        train_draft(args.work, ARTIFACTS / "draft", epochs=args.draft_epochs, max_minutes=90)
    train_head(args.work, ARTIFACTS / "draft", ARTIFACTS / "head_greedy", mode="greedy", temperature=0.0)
    train_head(args.work, ARTIFACTS / "draft", ARTIFACTS / "head_sampled", mode="sampled", temperature=1.0)


if __name__ == "__main__":
    main()
