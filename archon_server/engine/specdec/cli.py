"""``archon specdec``: points at the offline tooling, which lives outside the serving package.

Training and the policy benchmark (``training/specdec/``) read the checkout's benchmark data
and pull in training-only code; the installed server must not import them (dependencies point
from the tooling to the package, never back), so this subcommand only says where they are.
"""

from __future__ import annotations

import argparse
import sys

MESSAGE = ("`archon specdec` moved out of the serving package: run it from a checkout of archon-server as\n"
           "  python -m training.specdec build-data | merge-data | train-draft | train-head | bench [...]\n"
           "(python -m training.specdec --help lists the options)")


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("specdec", help="SpecDec++ training/benchmark: moved to `python -m training.specdec` (a checkout)",
                              description=MESSAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_moved)
    return p


def _moved(args: argparse.Namespace) -> int:
    print(f"error: {MESSAGE}", file=sys.stderr)
    return 2
