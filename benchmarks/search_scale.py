"""Does a search scale out?  The same 40-trial search with 1, 2 and 4 worker processes on one PostgreSQL
study, against a fake upstream with a fixed latency per call, side by side in one run; then the rows per
second the shared sweep store sustains.

Trials are I/O-bound (each is many backend calls), so N workers should finish N times sooner, less
what process start-up and the database cost: the goal is >= 3.2x at 4 workers.  Two times are printed
per worker count: ``wall`` (``archon search run --workers N`` end to end, process start-up included)
and ``trials`` (first trial start to last trial end, from the study itself).  ``--repeats`` runs the
whole comparison several times and prints medians and ranges.

    python benchmarks/search_scale.py                    # starts a throwaway PostgreSQL (Debian's postgresql)
    python benchmarks/search_scale.py --url postgresql://user@host/db --latency 0.5 --repeats 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from archon_server.config import PRESET_ALIASES  # noqa: E402
from archon_server.testing.postgres import TempPostgres, create_database  # noqa: E402
from archon_server.testing.upstream import FakeUpstream  # noqa: E402


def _write_configs(tmp: Path, upstream_url: str, n_trials: int, dev_questions: int) -> Path:
    server = {"backends": [{"alias": "fake", "kind": "openai", "model": "fake-model", "urls": [upstream_url],
                            "aliases": PRESET_ALIASES, "max_retries": 1, "read_timeout_s": 30}]}
    (tmp / "server.yaml").write_text(yaml.safe_dump(server))
    search = {
        "study": {"name": "scale", "n_trials": n_trials, "sampler": {"type": "random", "seed": 0},
                  "pruner": {"type": "none"}, "heartbeat_interval": 10},
        "objective": {"mode": "scalar", "cost": "calls", "lambda": 0.002},
        "budget": {"max_calls_per_query": 16, "max_fuser_inputs": 6},
        "evaluation": {"evaluator": "bench", "dataset": "math500", "backends": str(tmp / "server.yaml"),
                       "stages": [], "dev_limit": dev_questions, "test_top": 0, "baselines": False, "concurrency": 8},
        "models": [{"name": "proposer-1", "score": 0.6}, {"name": "proposer-2", "score": 0.5}, {"name": "proposer-3", "score": 0.4}],
        "space": {"families": ["moa", "self_moa"], "top_k_models": [1, 3], "samples_per_model": [1, 3],
                  "fusion_layers": [0, 2], "fusers_per_layer": [1, 2], "critic": [False, True], "ranker": [False, True],
                  "ranker_top_k": 3, "final": ["none", "verifier"], "self_moa_model_rank": [0, 1],
                  "self_moa_samples": {"low": 4, "high": 8, "step": 4}},
        "export": {"report_dir": str(tmp / "runs")},
    }
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(search))
    return path


def run_search(cluster_url: str, cfg: Path, workers: int, tmp: Path) -> dict[str, float]:
    url = create_database(cluster_url)
    # A fresh call cache per run: a cache warmed by the previous run would make later runs look faster.
    data = yaml.safe_load(cfg.read_text())
    data["export"]["report_dir"] = str(tmp / f"runs-{url.rsplit('/', 1)[1]}")
    cfg = cfg.with_name(f"search-{url.rsplit('/', 1)[1]}.yaml")
    cfg.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "archon_server.search", "run", str(cfg), "--storage", url, "--workers", str(workers),
                    "--no-finalize", "--no-export"], env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    from archon_server.search.objective import is_evaluated
    from archon_server.search.storage import make_storage

    study = optuna.load_study(study_name="scale", storage=make_storage(url, heartbeat_interval=None))
    done = [t for t in study.get_trials() if t.datetime_start and t.datetime_complete]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {"wall": wall, "trials": span, "evaluated": sum(is_evaluated(t) for t in study.get_trials())}


# -- sweep store throughput --------------------------------------------------------------------------
def _store_worker(url: str, idx: int, rows: int, q: mp.Queue) -> None:
    from archon_server.bench.store import StoreResults, make_engine

    engine = make_engine(url)
    res = StoreResults(engine, "throughput", worker=f"bench:{idx}")
    t0 = time.perf_counter()
    for i in range(rows):
        item = f"q{idx}-{i}"
        assert res.claim_sync("arch", "math500", item)
        res.append_sync({"arch": "arch", "benchmark": "math500", "id": item, "score": 1.0, "output": "x" * 200})
    q.put(time.perf_counter() - t0)
    engine.dispose()


def store_rows_per_s(cluster_url: str, procs: int, rows: int) -> float:
    """Claim + write ``rows`` result rows from each of ``procs`` processes at once (what sweep workers do per question)."""
    url = create_database(cluster_url)
    from archon_server.bench.store import make_engine

    make_engine(url).dispose()  # tables first
    q: mp.Queue = mp.Queue()
    ps = [mp.Process(target=_store_worker, args=(url, i, rows, q)) for i in range(procs)]
    t0 = time.perf_counter()
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    wall = time.perf_counter() - t0
    return procs * rows / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="PostgreSQL cluster URL (a database per run is created on it); default: a throwaway cluster")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--latency", type=float, default=1.0, help="seconds per upstream call")
    ap.add_argument("--dev-questions", type=int, default=4, help="questions per trial")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--store-rows", type=int, default=500, help="rows per process for the sweep-store throughput")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    pg = None if args.url else TempPostgres().start()
    cluster = args.url or pg.url  # type: ignore[union-attr]
    up = FakeUpstream(latency=args.latency).start()
    try:
        with tempfile.TemporaryDirectory(prefix="archon-scale-") as d:
            tmp = Path(d)
            cfg = _write_configs(tmp, up.url, args.trials, args.dev_questions)
            print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} on {os.cpu_count()} cores; "
                  f"{args.trials} trials, {args.dev_questions} questions each, upstream latency {args.latency}s", flush=True)
            runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
            for r in range(args.repeats):
                for n in counts:
                    res = run_search(cluster, cfg, n, tmp)
                    runs[n].append(res)
                    print(f"  repeat {r} workers {n}: wall {res['wall']:.1f}s trials {res['trials']:.1f}s "
                          f"evaluated {res['evaluated']:.0f}", flush=True)
            base = {k: statistics.median(x[k] for x in runs[counts[0]]) for k in ("wall", "trials")}
            print(f"\n{'workers':>7} {'wall s (median, range)':>24} {'speed-up':>9} {'trials s (median, range)':>26} {'speed-up':>9}")
            for n in counts:
                cols = []
                for k in ("wall", "trials"):
                    xs = [x[k] for x in runs[n]]
                    med = statistics.median(xs)
                    cols.append(f"{med:8.1f} ({min(xs):.1f}-{max(xs):.1f})".rjust(24 if k == "wall" else 26))
                    cols.append(f"{base[k] / med:8.2f}x")
                print(f"{n:>7} {' '.join(cols)}")
            for procs in (1, 4):
                rps = store_rows_per_s(cluster, procs, args.store_rows)
                print(f"sweep store: {rps:.0f} rows/s (claim + result write per row, {procs} process(es) x {args.store_rows} rows)")
            print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        up.stop()
        if pg is not None:
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
