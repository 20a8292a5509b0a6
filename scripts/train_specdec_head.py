#!/usr/bin/env python
"""Reproduce the shipped SpecDec++ artifacts (draft + heads) on CPU.

    python scripts/train_specdec_head.py            # build data, train draft, both heads
    python scripts/train_specdec_head.py --skip-data --skip-draft   # heads only
"""

from __future__ import annotations

import argparse
from pathlib import Path

from archon_server.engine.specdec.loading import ARTIFACTS
from archon_server.engine.specdec.train import DEFAULT_WORK, build_data, train_draft, train_head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--n-prompts", type=int, default=200)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--draft-epochs", type=int, default=4)
    ap.add_argument("--resume-epochs", type=int, default=12,
                    help="second run from the first one's weights (the shipped draft stopped after 7 of 12 at the 16-minute budget)")
    ap.add_argument("--resume-minutes", type=float, default=16.0)
    ap.add_argument("--skip-data", action="store_true")
    ap.add_argument("--skip-draft", action="store_true")
    args = ap.parse_args()
    if not args.skip_data:
        build_data(args.work, n_prompts=args.n_prompts, max_new=args.max_new)
    if not args.skip_draft:
        first = args.work / "draft_stage1"
        train_draft(args.work, first, epochs=args.draft_epochs)
        train_draft(args.work, ARTIFACTS / "draft", epochs=args.resume_epochs, resume=first,
                    max_minutes=args.resume_minutes)
    train_head(args.work, ARTIFACTS / "draft", ARTIFACTS / "head_greedy", mode="greedy", temperature=0.0)
    train_head(args.work, ARTIFACTS / "draft", ARTIFACTS / "head_sampled", mode="sampled", temperature=1.0)


if __name__ == "__main__":
    main()
