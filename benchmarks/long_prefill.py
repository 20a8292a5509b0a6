"""A long prompt to a fresh embedded engine on busy cores: the thread tuner's setting against fixed thread counts.

    python benchmarks/long_prefill.py [--load 2] [--tokens 4800] [--rounds 2] [--threads auto,1,2]

Why: the engine's thread tuner (``engine/threads.py``) used to judge decode steps only, so a long prompt that came
first on busy cores was prefilled at the untested default of 2 threads, whose OpenMP barriers spin while a thread
waits to be scheduled (a 4,900-token prefill: 228 s wall, 147 CPU-s against 64 s and 30 CPU-s at 1 thread). Each
setting gets a fresh engine (a fresh tuner) and ``--rounds`` prompts of about ``--tokens`` tokens, each new (no
prefix-cache hit), ``max_tokens`` 1; settings alternate round by round so that changing load falls on all of them.
``--load N`` starts N busy processes, each in a session of its own as another job's would be (as
``benchmarks/backends.py --load`` does). Prints wall and CPU seconds of each prompt and the medians per setting.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backends import start_load  # noqa: E402  (benchmarks/backends.py: busy processes in sessions of their own)

from archon_server.backends.base import ChatRequest, SamplingParams  # noqa: E402
from archon_server.backends.local import LocalBackend  # noqa: E402

LINE = "the quick brown fox jumps over the lazy dog near river {i}."


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _one(setting: str, tokens: int, rounds: int) -> list[tuple[float, float, int]]:
    """``rounds`` new long prompts to a fresh engine at ``setting``: (wall s, CPU s, prompt tokens) of each."""
    backend = LocalBackend(progress=False, threads=setting if setting == "auto" else int(setting))
    await backend.start()
    out = []
    try:
        for k in range(rounds):
            text = " ".join(f"Line {i} ({setting}, {k}, {time.time()}): " + LINE.format(i=i) for i in range(tokens // 45))  # ~45 tokens a line
            c0, t0 = _cpu(), time.perf_counter()
            r = await backend.chat(ChatRequest(model="bench", messages=[{"role": "user", "content": text}],
                                               params=SamplingParams(max_tokens=1, temperature=0.0)))
            out.append((time.perf_counter() - t0, _cpu() - c0, r.usage.prompt_tokens))
    finally:
        await backend.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", type=int, default=2, help="busy processes beside the engine")
    ap.add_argument("--tokens", type=int, default=4800)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; each setting gets a fresh engine per round")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per engine")
    ap.add_argument("--threads", default="auto,1,2")
    a = ap.parse_args()
    settings = a.threads.split(",")
    busy = start_load(a.load)
    results: dict[str, list[tuple[float, float, int]]] = {s: [] for s in settings}
    try:
        for rnd in range(a.rounds):
            for s in settings:
                for wall, cpu, n in asyncio.run(_one(s, a.tokens, a.prompts)):
                    results[s].append((wall, cpu, n))
                    print(f"round {rnd} threads {s:>4}: {n} prompt tokens  {wall:7.1f} s wall  {cpu:7.1f} CPU-s  "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for p in busy:
            p.kill()
    print(f"medians over {a.rounds} rounds x {a.prompts} prompts, {a.load} busy processes beside the engine:")
    for s, rows in results.items():
        walls, cpus = [r[0] for r in rows], [r[1] for r in rows]
        print(f"  threads {s:>4}: {statistics.median(walls):7.1f} s wall ({min(walls):.1f}-{max(walls):.1f}), "
              f"{statistics.median(cpus):7.1f} CPU-s ({min(cpus):.1f}-{max(cpus):.1f})")


if __name__ == "__main__":
    main()
