"""``archon search`` commands: ``run`` (one or several workers on a shared study), ``export``, ``status``.

``add_cli(subparsers)`` registers ``search`` on the caller's argparse subparsers; every
leaf sets ``func(args) -> int``.  ``python -m archon_server.search ...`` runs the same
commands standalone (that is what ``--workers N`` spawns, and what tests drive).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import optuna

from archon_server.spec import SpecError

log = logging.getLogger("archon.search.cli")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: must be 1 or more")
    return n


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("search", help="architecture search with Optuna (cost-aware, resumable, distributed)")
    sub = p.add_subparsers(dest="search_command", metavar="{run,export,status,dashboard}")
    sub.required = True

    r = sub.add_parser("run", help="run (or resume) a search study until it holds its target number of trials")
    r.add_argument("config", help="search config YAML (search/*.yaml)")
    r.add_argument("--storage", help="Optuna RDB URL (default: config's, else sqlite:///runs/search/<study>.db)")
    r.add_argument("--study", help="study name (default: config's study.name)")
    r.add_argument("--n-trials", type=_positive, help="target of new architectures evaluated in the whole study (all workers, "
                   "all runs); stored in the study. Default: the config's study.n_trials when the study is new or that "
                   "value changed since the study last saw it (a larger one on resume runs more trials), else the "
                   "stored target")
    r.add_argument("--workers", type=_positive, default=1, help="worker processes to start on this machine (default 1)")
    r.add_argument("--worker-index", type=_worker_index, default=0, help="offsets the sampler seed so workers propose "
                   "different points; `auto`: derived from host name and pid (for replicas started alike, e.g. by compose)")
    r.add_argument("--no-finalize", action="store_true", help="skip test-split scoring of the best trials and baselines")
    r.add_argument("--no-export", action="store_true", help="do not write the architecture YAML and report")
    r.add_argument("--out", help="architecture output folder (default: config export.dir)")
    r.add_argument("--report-dir", help="report folder (default: <export.report_dir>/<study>)")
    r.add_argument("-v", "--verbose", action="store_true")
    r.add_argument("--no-progress", "-q", "--quiet", dest="no_progress", action="store_true",
                   help="no progress on stderr (by default: the phases, the resume, a line per finished trial with its "
                   "value, the best so far and evaluated trials of the target)")
    # a --workers child, given its parent's pid: the parent reports Ctrl-C, and the child ends as on Ctrl-C when the
    # parent dies (kill -9 included) instead of running on unwatched
    r.add_argument("--spawned", type=int, default=None, metavar="PID", help=argparse.SUPPRESS)
    r.set_defaults(func=_cli_errors(cmd_run))

    e = sub.add_parser("export", help="write the best architecture YAML and the markdown report of a study")
    e.add_argument("config", nargs="?", help="search config YAML (gives storage/study defaults; needed for --finalize)")
    e.add_argument("--storage", help="Optuna RDB URL")
    e.add_argument("--study", help="study name (default: the only study in the storage)")
    e.add_argument("--name", help="architecture name (default: <study>-best)")
    e.add_argument("--out", default=None, help="architecture output folder (default: architectures)")
    e.add_argument("--report-dir", default=None, help="report folder (default: runs/search/<study>)")
    e.add_argument("--finalize", action="store_true", help="score best trials + baselines on the test split first (needs CONFIG)")
    e.set_defaults(func=_cli_errors(cmd_export))

    s = sub.add_parser("status", help="progress of a study (counts, best trial) as JSON")
    s.add_argument("config", nargs="?")
    s.add_argument("--storage")
    s.add_argument("--study")
    s.set_defaults(func=_cli_errors(cmd_status))

    d = sub.add_parser("dashboard", help="browse a study in optuna-dashboard (pip install 'archon-server[dashboard]')")
    d.add_argument("config", nargs="?", help="search config YAML (gives the storage/study defaults)")
    d.add_argument("--storage", help="Optuna RDB URL (sqlite:///..., postgresql://...)")
    d.add_argument("--study", help="study to print the link of (the dashboard lists every study in the storage)")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.set_defaults(func=_cli_errors(cmd_dashboard))
    return p


# -- helpers ------------------------------------------------------------------------------------------
def _worker_index(value: str) -> int:
    if value == "auto":
        import zlib

        from archon_server.db import worker_id

        return zlib.crc32(worker_id().encode()) % 100_000
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--worker-index: an integer or 'auto', not {value!r}") from None


def _cli_errors(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Every command's expected failures as one line on stderr, no traceback: a bad config or a refused study
    (:class:`SpecError`: the file and field, exit 2), a database that cannot be opened (exit 2), Ctrl-C (exit 130)."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        import sqlalchemy.exc

        from archon_server.db import DatabaseURLError

        try:
            return cmd(args)
        except SpecError as e:
            for line in e.errors:
                print(f"{e.source + ': ' if e.source else ''}{line}", file=sys.stderr)
            return 2
        except DatabaseURLError as e:  # a storage URL no database answers to (not a URL, no such kind, no driver)
            print(e, file=sys.stderr)
            return 2
        except sqlalchemy.exc.OperationalError as e:  # the storage URL points at a database that is down or unknown
            from archon_server.db import unreachable_message

            print(unreachable_message(getattr(args, "resolved_storage", None) or args.storage or "", e), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if not getattr(args, "spawned", False):
                print(_interrupted_message(args), file=sys.stderr)
            return 130

    return run


def _interrupted_message(args: argparse.Namespace) -> str:
    from archon_server.db import redacted

    study, url = getattr(args, "resolved_study", None), getattr(args, "resolved_storage", None)
    if args.search_command != "run" or url is None:
        return "interrupted"
    again = ["archon search run", args.config, "--storage", redacted(url)]
    if args.study:
        again += ["--study", args.study]
    if args.workers > 1:
        again += ["--workers", str(args.workers)]
    return (f"interrupted: study {study!r} is saved in {redacted(url)} (a running trial is re-run on resume); "
            f"to resume: {' '.join(again)}")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)


def _resolve(args: argparse.Namespace) -> tuple[Any, str, str | None]:
    """(config or None, storage URL, study name or None) from CONFIG and flags."""
    from archon_server.search.config import load_search_config

    cfg = load_search_config(args.config) if getattr(args, "config", None) else None
    storage = args.storage or (cfg.storage_url() if cfg else None)
    if storage is None:
        raise SystemExit("error: give CONFIG or --storage")
    study = args.study or (cfg.study.name if cfg else None)
    args.resolved_storage, args.resolved_study = storage, study  # for the error and interrupt messages
    return cfg, storage, study


def _load_study(storage_url: str, study_name: str | None) -> optuna.Study:
    from archon_server.search.storage import open_existing_study

    return open_existing_study(storage_url, study_name)  # creates nothing; a missing study is a one-line error


def _export(study: optuna.Study, storage_url: str, cfg: Any, out: str | None, report_dir: str | None, name: str | None) -> dict[str, Any]:
    from archon_server.search.report import export_best, write_report

    out = out or (cfg.export.dir if cfg else "architectures")
    name = name or (cfg.export.name if cfg and cfg.export.name else None)
    report_dir = report_dir or str(Path(cfg.export.report_dir if cfg else "runs/search") / study.study_name)
    path, _ = export_best(study, out, name)
    rep = write_report(study, report_dir, storage_url)
    return {"architecture": str(path), "report": str(rep.markdown)}


def _summary(study: optuna.Study, cfg: Any = None) -> dict[str, Any]:
    """A study's progress as JSON. A RUNNING trial whose heartbeat is older than the grace period (the config's,
    else the one the study was created with) counts as ``stale``, not ``running``: its worker is dead, and the next
    worker to run retries it (``stale_trials``: each with its heartbeat's age). ``failed`` counts final failures only
    (``failed_trials``: each with its error); a trial whose worker died and whose parameters were queued again counts
    in ``retried``, one released unrun once the target was reached in ``surplus``."""
    from archon_server.search.report import best_trial
    from archon_server.search.runner import (
        STUDY_CONFIG,
        STUDY_TARGET,
        failed_trials,
        grace_period_s,
        progress,
        running_trials,
    )

    p = progress(study)
    out: dict[str, Any] = {"study": study.study_name, "target": study.user_attrs.get(STUDY_TARGET), **p.__dict__}
    if p.failed:
        stored = (study.user_attrs.get(STUDY_CONFIG) or {}).get("study") or {}
        out["failed_trials"] = failed_trials(study, cfg.study.max_retry if cfg is not None else stored.get("max_retry", 2))
    grace = grace_period_s(cfg if cfg is not None else study.user_attrs.get(STUDY_CONFIG))
    live, stale = running_trials(study, grace)
    out["running"] -= len(stale)
    out["stale"] = len(stale)
    if live:
        out["running_trials"] = live
    if stale:
        out["stale_trials"] = stale
    if live or stale:
        out["grace_period_s"] = grace
    try:
        t = best_trial(study)
        out["best"] = {"trial": t.number, "values": t.values, "params": t.params}
    except LookupError:
        out["best"] = None
    return out


# -- commands -----------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    cfg, storage, study_name = _resolve(args)
    assert cfg is not None
    return _run(args, cfg, storage, study_name)


def _as_ctrl_c(signum: int, frame: object) -> None:
    """A --workers child's SIGTERM (its parent died, or someone stopped it) ends it as Ctrl-C does: its running trial
    handed back. Once: the kernel sends a parent-death signal for each of the process's threads that inherited the
    setting, and a second interrupt would break into the handing back. SIGINT itself may be ignored (a parent started
    in the background with ``&``), hence the handler put back first."""
    signal.signal(signum, signal.SIG_IGN)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.raise_signal(signal.SIGINT)  # asyncio.run's handler, where it runs: the main task cancelled


def _run(args: argparse.Namespace, cfg: Any, storage: str, study_name: str | None) -> int:
    if args.spawned:
        from archon_server.backends.process import die_with_parent

        signal.signal(signal.SIGTERM, _as_ctrl_c)
        die_with_parent(args.spawned)  # SIGTERM when the parent dies, kill -9 included
    from archon_server.bench.progress import Reporter
    from archon_server.search.runner import (
        check_evaluation,
        finalize_study,
        grace_period_s,
        open_study,
        progress,
        resume_line,
        run_search,
        study_target,
    )

    report = Reporter(enabled=not args.no_progress)
    if args.workers > 1:
        # Worker processes share nothing but the storage URL, exactly like workers on other machines.
        cmd = [sys.executable, "-m", "archon_server.search", "run", args.config, "--storage", storage,
               "--study", study_name or cfg.study.name, "--no-finalize", "--no-export"]
        if args.n_trials:
            cmd += ["--n-trials", str(args.n_trials)]
        if args.verbose:
            cmd.append("-v")
        if args.no_progress:
            cmd.append("--no-progress")
        cmd += ["--spawned", str(os.getpid())]
        # A config the workers would refuse is refused here, before the study exists; then the study (and its
        # target) is created once, before the workers race to do it.
        check_evaluation(cfg)
        study = open_study(cfg, storage=storage, study_name=study_name)
        # What this run resumes, said once here: each worker would say it again, and the second of a fresh study's
        # workers would take the first one's running trial for something to resume.
        if report.enabled and study.get_trials(deepcopy=False):
            report.line(resume_line(study, study_target(study, cfg, args.n_trials), grace_period_s(cfg)))
        procs = [subprocess.Popen(cmd + ["--worker-index", str(args.worker_index + i)]) for i in range(args.workers)]
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:  # Ctrl-C reached the workers too: let them hand back their trials, then report
            for p in procs:
                p.wait()
            raise
        if any(codes):
            print(f"error: worker exit codes {codes}", file=sys.stderr)
            return 1
        study = open_study(cfg, storage=storage, study_name=study_name)
        if not args.no_finalize:
            asyncio.run(finalize_study(cfg, study, report=report))
    else:
        res = asyncio.run(run_search(cfg, storage=storage, study_name=study_name, n_trials=args.n_trials,
                                     seed_offset=args.worker_index, do_finalize=not args.no_finalize, report=report,
                                     say_resume=not args.spawned))
        study = res.study
        if args.verbose:
            log.info("worker stats: %s", res.stats)
    summary = _summary(study, cfg)
    if not args.no_export and progress(study).evaluated:
        summary.update(_export(study, storage, cfg, args.out, args.report_dir, None))
    print(json.dumps(summary, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _setup_logging(False)
    cfg, storage, study_name = _resolve(args)
    study = _load_study(storage, study_name)
    if args.finalize:
        if cfg is None:
            print("error: --finalize needs CONFIG (it evaluates on the test split)", file=sys.stderr)
            return 2
        from archon_server.search.runner import check_same_search, finalize_study

        from archon_server.bench.progress import Reporter

        check_same_search(cfg, study, storage)  # the test split is scored as the study's own config says
        asyncio.run(finalize_study(cfg, study, report=Reporter()))
    try:
        out = _export(study, storage, cfg, args.out, args.report_dir, args.name)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _setup_logging(False)
    cfg, storage, study_name = _resolve(args)
    print(json.dumps(_summary(_load_study(storage, study_name), cfg), default=str))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard over the same storage the workers use; trials carry the graph YAML (``spec``), cost
    per query, dev score and one ``stage_<n>`` score per cheap-first stage as user attributes."""
    _setup_logging(False)
    try:
        from optuna_dashboard import run_server
    except ImportError:
        print("error: optuna-dashboard is not installed: pip install 'archon-server[dashboard]'", file=sys.stderr)
        return 2
    _, storage_url, study_name = _resolve(args)
    study = _load_study(storage_url, study_name) if study_name or args.config else None
    page = f"http://{args.host}:{args.port}/dashboard"
    if study is not None:
        page += f"/studies/{study._study_id}"  # noqa: SLF001 - the dashboard's URLs use the storage's id
    print(f"optuna-dashboard on {page} (Ctrl-C stops)", flush=True)
    from archon_server.search.storage import make_storage

    run_server(make_storage(storage_url, heartbeat_interval=None), host=args.host, port=args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="archon")
    add_cli(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "search":
        argv = ["search", *argv]  # `python -m archon_server.search run ...`
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
