"""Why the engine loads its model in a thread that ends (engine/threads.py::in_fresh_thread), measured.

    python benchmarks/omp_pools.py [--steps 200]

The same one-sequence decode loop of the default model (SmolLM2), in three fresh processes one after the other:
``same``: loaded and decoded on the main thread (one OpenMP pool); ``two-pools``: loaded on the main thread,
decoded on another (two long-lived pools: once libgomp's threads outnumber the cores its barriers sleep instead
of spinning, and a decode step synchronises hundreds of times); ``loader-ended``: loaded by ``in_fresh_thread``
(the engine's way), decoded on another thread.  Prints ms per step and the ratios side by side.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = ("same", "two-pools", "loader-ended")


def decode_ms(runner, steps: int) -> float:  # type: ignore[no-untyped-def]
    import torch

    cache = runner.new_cache(1, 512)
    runner.forward(torch.tensor([list(range(100, 130))]), cache, 0, [0], small_weights=False, kv_grid=32)
    runner.decode([5], cache)
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.decode([5], cache)
    return (time.perf_counter() - t0) / steps * 1e3


def on_other_thread(fn):  # type: ignore[no-untyped-def]
    box = {}
    t = threading.Thread(target=lambda: box.update(v=fn()))
    t.start()
    t.join()
    return box["v"]


def run_case(case: str, steps: int) -> float:
    from archon_server.engine.loader import load_model
    from archon_server.engine.threads import in_fresh_thread

    if case == "loader-ended":
        runner = in_fresh_thread(lambda: load_model(progress=False)).runner
    else:
        runner = load_model(progress=False).runner
    if case == "same":
        return decode_ms(runner, steps)
    return on_other_thread(lambda: decode_ms(runner, steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    args = ap.parse_args()
    if args.case:
        print(f"{run_case(args.case, args.steps):.3f}")
        return
    ms = {}
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        ms[case] = float(out.stdout.strip().splitlines()[-1])
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; ms per decode step (SmolLM2, one sequence)")
    for case in CASES:
        print(f"  {case:13s} {ms[case]:7.2f} ms   {ms[case] / ms['same']:.2f}x of 'same'")


if __name__ == "__main__":
    main()
