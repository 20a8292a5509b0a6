"""`archon bench ...`: run sweeps, write reports, score AlpacaEval annotation files.

Registered by the main CLI through :func:`add_cli` (handlers set ``fn``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any


def _fail(msg: str) -> int:
    print(msg, file=sys.stderr)
    return 2


def _data_dir_error(data: str | None) -> str | None:
    """The one-line error for a benchmark data folder that is not there (--data, $ARCHON_DATA_DIR, the default)."""
    from .paths import DataNotFound, data_dir

    try:
        data_dir(data)
    except DataNotFound as e:
        return f"--data: {e}" if data else str(e)
    return None


def _needs_data(out: Path) -> bool:
    """Whether the report of ``out`` reads the data folder: it holds AlpacaEval results."""
    from .report import load_records

    return any(r.get("benchmark") == "alpaca_eval" for r in load_records(out))


def cmd_run(args: argparse.Namespace) -> int:
    import sqlalchemy.exc

    from ..db import DatabaseURLError
    from .paths import DataNotFound

    try:
        return _run(args)
    except DatabaseURLError as e:  # --store names no database this machine can open (not a URL, no such kind, no driver)
        return _fail(str(e))
    except sqlalchemy.exc.OperationalError as e:  # --store points at a database that is down or unknown
        from ..db import unreachable_message

        return _fail(unreachable_message(args.store or "", e))
    except DataNotFound as e:  # a benchmark's file is missing from the data folder
        return _fail(f"{args.sweep}: {e}")


def _run(args: argparse.Namespace) -> int:
    from .report import write_report
    from .sweep import ResultsLog, limit_problem, load_sweep, run_sweep

    if args.limit is not None and args.limit < 1:
        return _fail(f"--limit {args.limit}: must be 1 or more (at most this many questions per benchmark), or left out")
    sweep_path = Path(args.sweep)
    spec = load_sweep(sweep_path)
    if (err := _data_dir_error(args.data)) is not None:
        return _fail(err)
    out = Path(args.out or Path("runs") / "bench" / spec.name)
    unlimited = [b.n for b in spec.benchmarks]
    if args.limit is not None:
        for b in spec.benchmarks:
            b.n = min(b.n or args.limit, args.limit)
    if not args.store and (problem := limit_problem(spec, out, args.limit, unlimited)) is not None:
        return _fail(f"{sweep_path}: {problem}")
    try:
        log = asyncio.run(run_sweep(spec, out, config_path=args.config,
                                    base_dir=sweep_path.parent.parent if sweep_path.parent.name == "benchmarks" else sweep_path.parent,
                                    cache=not args.no_cache, progress=not args.no_progress, data_root=args.data,
                                    store_url=args.store))
    except KeyboardInterrupt:
        # asyncio.run cancelled the sweep: every finished question is on disk (or in the store), none half-written.
        where = f"the store {args.store}" if args.store else str(out)
        n = "" if args.store else f"{len(ResultsLog(out / 'results.jsonl', create=False).records)} "
        print(f"\ninterrupted: {n}results saved in {where}; run the same command to resume", file=sys.stderr)
        return 130
    paths = write_report(out, title=f"Sweep {spec.name}", data_root=args.data)
    print(Path(paths["markdown"]).read_text(encoding="utf-8"))
    print(f"{len(log.records)} results in {out / 'results.jsonl'}; report {paths['markdown']}, plot {paths['plot']}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import sqlalchemy.exc

    from ..db import DatabaseURLError

    try:
        return _report(args)
    except DatabaseURLError as e:  # --store names no database this machine can open (not a URL, no such kind, no driver)
        return _fail(str(e))
    except sqlalchemy.exc.OperationalError as e:
        from ..db import unreachable_message

        return _fail(unreachable_message(args.store or "", e))


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = Path(args.out)
    if args.store:  # a shared sweep: results.jsonl from the store first (all workers' rows)
        from .store import SweepStore

        name = args.sweep
        if name is None:
            saved = out / "sweep.json"
            if not saved.exists():
                return _fail(f"{out}: no sweep.json to name the sweep in the store; pass --sweep NAME")
            name = json.loads(saved.read_text(encoding="utf-8"))["name"]
        store = SweepStore(args.store, name)
        try:
            known = store.sweeps()
            if name not in known:
                return _fail(f"--sweep: the store holds no sweep {name!r} (it holds: {', '.join(known) or 'none'})")
            store.results.export_jsonl(out / "results.jsonl")
        finally:
            store.close()
    elif not (out / "results.jsonl").exists():
        what = "no such folder" if not out.is_dir() else "no results.jsonl (run `archon bench run` first, or pass --store)"
        return _fail(f"{out}: {what}")
    # Only AlpacaEval's export (its instructions) and LC difficulties read the data folder: a sweep without it is
    # reported from the results alone (a machine that only reaches the store).
    if _needs_data(out) and (err := _data_dir_error(args.data)) is not None:
        return _fail(f"{err} (the AlpacaEval results of {out} are exported with its instructions)")
    paths = write_report(out, data_root=args.data)
    print(Path(paths["markdown"]).read_text(encoding="utf-8"))
    return 0


def cmd_score_alpaca(args: argparse.Namespace) -> int:
    from . import alpaca_eval as ae
    from .paths import data_file

    systems: dict[str, list[ae.Judged]] = {}
    try:
        for f in args.annotations:
            for name, rows in ae.load_annotations(f).items():
                systems.setdefault(name, []).extend(rows)
    except (OSError, ValueError) as e:  # a missing file, or one that is not annotations (model_outputs.json)
        return _fail(str(e))
    instructions = ae.load_eval_instructions(args.data)
    if args.difficulty:
        difficulty = ae.load_difficulty(args.difficulty, instructions)
    else:
        pool: dict[str, list[ae.Judged]] = {}
        if not args.no_reference:
            pool = ae.load_compact(args.reference or data_file("alpaca_eval/annotations_compact_dev.csv.gz", args.data), instructions)
        pool.update(systems)
        difficulty = ae.estimate_difficulty(pool)
        if args.save_difficulty:
            ae.save_difficulty(difficulty, args.save_difficulty)
    gamed = []
    try:
        for f in args.gamed or []:
            gamed += list(ae.load_annotations(f).values())
    except (OSError, ValueError) as e:
        return _fail(f"--gamed: {e}")
    lb = {}
    if args.leaderboard:
        lb = ae.load_leaderboard(data_file("alpaca_eval/leaderboard_alpaca_eval2_weighted_alpaca_eval_gpt4_turbo.csv", args.data))
    results = {s: ae.length_controlled_win_rate(rows, difficulty, gamed_baselines=gamed) for s, rows in systems.items()}
    if args.json:
        print(json.dumps({s: r.as_dict() for s, r in results.items()}, indent=2))
        return 0
    head = f"{'system':36s} {'n':>4s} {'win_rate':>9s} {'se':>5s} {'LC':>7s} {'lc_se':>6s}"
    print(head + ("   lb_LC  lb_raw" if lb else ""))
    for s, r in sorted(results.items(), key=lambda kv: -kv[1].length_controlled_winrate):
        line = f"{s:36s} {r.n_total:4d} {r.win_rate:9.2f} {r.standard_error:5.2f} {r.length_controlled_winrate:7.2f} {r.lc_standard_error:6.2f}"
        if lb and s in lb:
            line += f"  {lb[s].get('length_controlled_winrate') or float('nan'):6.2f}  {lb[s].get('win_rate') or float('nan'):6.2f}"
        print(line)
    return 0


def cmd_difficulty(args: argparse.Namespace) -> int:
    from . import alpaca_eval as ae
    from .paths import data_file

    instructions = ae.load_eval_instructions(args.data)
    pool = ae.load_compact(args.reference or data_file("alpaca_eval/annotations_compact_dev.csv.gz", args.data), instructions)
    ae.save_difficulty(ae.estimate_difficulty(pool), args.output)
    print(f"wrote difficulties of {len(instructions)} instructions from {len(pool)} systems to {args.output}", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .datasets import LOADERS, load, split

    if (err := _data_dir_error(args.data)) is not None:  # no folder at all: one line, not "unavailable" per benchmark
        return _fail(err)
    for name in sorted(LOADERS):
        try:
            items = load(name, args.data)
            dev, test = split(items)
            print(f"{name:14s} {len(items):6d} items  dev {len(dev):5d}  test {len(test):5d}")
        except Exception as e:  # noqa: BLE001
            print(f"{name:14s} unavailable: {e}")
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from ..sandbox import SandboxLimits, isolation_mode, run_python

    code = Path(args.file).read_text(encoding="utf-8") if args.file != "-" else sys.stdin.read()
    r = run_python(code, limits=SandboxLimits(timeout_s=args.timeout, memory_mb=args.memory_mb))
    print(json.dumps({**r.as_dict(), "isolation": isolation_mode()}, indent=2))
    return 0 if r.passed else 1


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks: sweeps, reports, AlpacaEval scoring, sandbox")
    sub = p.add_subparsers(dest="bench_command", metavar="{run,report,score-alpaca,difficulty,list,sandbox}")
    sub.required = True

    r = sub.add_parser("run", help="run (or resume) a sweep of architectures × benchmarks, then write the report")
    r.add_argument("sweep", help="sweep YAML (benchmarks/<name>.yaml)")
    r.add_argument("--out", help="output folder (default runs/bench/<sweep name>); re-running resumes")
    r.add_argument("--config", help="server config with the backends (default: the sweep's, else the embedded model)")
    r.add_argument("--limit", type=int, help="at most this many questions per benchmark")
    r.add_argument("--no-cache", action="store_true", help="do not cache backend calls")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--data", help="benchmark data folder (default $ARCHON_DATA_DIR or ../shared/data)")
    r.add_argument("--store", help="shared sweep store URL (postgresql://... or sqlite:///...): several workers, on any "
                   "hosts, split the sweep and share the call cache; results.jsonl is written from it")
    r.set_defaults(fn=cmd_run)

    rp = sub.add_parser("report", help="(re)write report.md, the plot and exported outputs of a sweep folder")
    rp.add_argument("out")
    rp.add_argument("--store", help="shared sweep store URL: write results.jsonl from it first")
    rp.add_argument("--sweep", help="sweep name in the store (default: OUT/sweep.json's)")
    rp.add_argument("--data", help="benchmark data folder (default $ARCHON_DATA_DIR or ../shared/data)")
    rp.set_defaults(fn=cmd_report)

    s = sub.add_parser("score-alpaca", help="raw and length-controlled win rates of AlpacaEval annotation files")
    s.add_argument("annotations", nargs="+", help="annotations.json files (official format)")
    s.add_argument("--difficulty", help="instruction difficulty CSV (instruction/idx, instruction_difficulty)")
    s.add_argument("--reference", help="compact annotations of more systems for difficulty estimation (default: shipped 20)")
    s.add_argument("--no-reference", action="store_true", help="estimate difficulty from the given files only")
    s.add_argument("--save-difficulty", help="write the estimated difficulties here")
    s.add_argument("--gamed", nargs="*", help="annotations of verbose/concise baselines vs the baseline (regularise to baseline)")
    s.add_argument("--leaderboard", action="store_true", help="print the official leaderboard values beside")
    s.add_argument("--json", action="store_true")
    s.add_argument("--data")
    s.set_defaults(fn=cmd_score_alpaca)

    d = sub.add_parser("difficulty", help="estimate AlpacaEval instruction difficulties from compact annotations")
    d.add_argument("--output", "-o", required=True)
    d.add_argument("--reference")
    d.add_argument("--data")
    d.set_defaults(fn=cmd_difficulty)

    ls = sub.add_parser("list", help="list benchmarks with item and split counts")
    ls.add_argument("--data")
    ls.set_defaults(fn=cmd_list)

    sb = sub.add_parser("sandbox", help="run a Python file in the sandbox and print the result record")
    sb.add_argument("file", help="file, or - for stdin")
    sb.add_argument("--timeout", type=float, default=10.0)
    sb.add_argument("--memory-mb", type=int, default=1024)
    sb.set_defaults(fn=cmd_sandbox)
    return p
