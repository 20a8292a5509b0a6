"""Decode steps with and without the engine's small-batch weight copies, interleaved in one process.

    python benchmarks/small_weights.py [--threads 2] [--rounds 3] [--steps 48] [--rows 1,6]

Two runners over the same model (``dtype="auto"``): one with ``small_weights="none"`` (the plain or packed
weights only) and one as the engine builds it (int8 copies on AVX512-BF16 hosts, FBGEMM float16 copies on float32
hosts), each timed for ``--steps`` decode steps at each row count, alternating for ``--rounds`` rounds so that the
machine's state moves both alike.  Prints the range and median of ms per step and the speed-up of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from archon_server.engine.model_store import DEFAULT_MODEL, pull
from archon_server.engine.runner import ModelRunner


def ms_per_step(runner: ModelRunner, rows: int, steps: int, prompt: list[int]) -> float:
    cache = runner.new_cache(slots=rows, capacity=len(prompt) + steps + 8)
    for slot in range(rows):
        runner.prefill(prompt, cache, slot)
    t = time.perf_counter()
    for _ in range(steps):
        runner.decode([5] * rows, cache, 0)
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rows", default="1,6")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = pull(a.model)
    runners = {"without": ModelRunner(path, device="cpu", small_weights="none"), "with": ModelRunner(path, device="cpu")}
    served = runners["with"]
    print(f"{a.model}: {served.dtype}, small-batch weights {served.small_kind or 'none'} up to {served.small_max_rows} "
          f"rows; {a.threads} thread(s)")
    rows_list = [int(r) for r in a.rows.split(",")]
    prompt = list(range(100, 300))
    times: dict[tuple[str, int], list[float]] = {(k, r): [] for k in runners for r in rows_list}
    for _ in range(a.rounds):
        for name, runner in runners.items():
            for rows in rows_list:
                times[(name, rows)].append(ms_per_step(runner, rows, a.steps, prompt))
    for rows in rows_list:
        off, on = times[("without", rows)], times[("with", rows)]
        print(f"rows {rows:2d}: without {min(off):.1f}-{max(off):.1f} ms/step (median {statistics.median(off):.1f}), "
              f"with {min(on):.1f}-{max(on):.1f} (median {statistics.median(on):.1f}): "
              f"{statistics.median(off) / statistics.median(on):.2f}x")


if __name__ == "__main__":
    main()
