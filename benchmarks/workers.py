"""`archon serve` on the embedded engine with one process and with ``--workers N`` (one shared backend host), side by side.

    python benchmarks/workers.py [--workers 2] [--repeats 3] [--max-tokens 128]

Each round starts the README's server (default config) as a user runs it, once with ``--workers 1`` (the engine in
the server process) and once with ``--workers N`` (the engine in the backend host, every call over its socket), one
after the other (never together: they would share the cores), and measures through the official SDK:

- single stream: one streamed greedy answer of ``max_tokens`` (EOS ignored), tokens/s;
- 6 concurrent: six such requests at once, total tokens/s (the engine batches them, from whichever worker);
- Self-MoA: the default architecture's answer (6 samples + 1 aggregation, EOS ignored), wall seconds.

Prints the median and range over the rounds and the ratio N workers ÷ 1 (speed: > 1 is faster), with the load
average, so what the extra hop costs the engine's path is measured, not assumed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archon_server.testing.server import serve_process  # noqa: E402

QUESTION = [{"role": "user", "content": "What are the main causes of the French Revolution? Answer in a few paragraphs."}]


def measure(client: openai.OpenAI, max_tokens: int) -> dict[str, float]:
    ignore = {"ignore_eos": True}

    def streamed(_: int) -> int:
        chunks = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=max_tokens,
                                                stream=True, stream_options={"include_usage": True}, extra_body=ignore)
        return next(c.usage.completion_tokens for c in reversed(list(chunks)) if c.usage)

    streamed(0)  # warm: the first request after start pays one-off costs
    t0 = time.perf_counter()
    single = streamed(0) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        total = sum(pool.map(streamed, range(6)))
    concurrent6 = total / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    client.chat.completions.create(model="self-moa", messages=QUESTION, max_tokens=max_tokens, seed=1, extra_body=ignore)
    return {"single tok/s": single, "6 concurrent tok/s": concurrent6, "self-moa s": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    root = str(Path(__file__).resolve().parent.parent)
    runs: dict[int, list[dict[str, float]]] = {1: [], args.workers: []}
    loads = [os.getloadavg()[0]]
    for r in range(args.repeats):
        for w in runs:
            with serve_process(["serve", "--workers", str(w), "--log-level", "warning"], cwd=root) as (_proc, url):
                client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
                runs[w].append(measure(client, args.max_tokens))
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}, workers {w}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[w][-1].items()), flush=True)
    print(f"\nload average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores; {args.repeats} rounds, "
          f"max_tokens {args.max_tokens}; median (range)")
    print(f"{'':22}{'workers 1':>22}{f'workers {args.workers}':>22}{'speed ratio':>14}")
    for key in runs[1][0]:
        one, many = ([x[key] for x in runs[w]] for w in runs)
        m1, mn = statistics.median(one), statistics.median(many)
        ratio = m1 / mn if key.endswith(" s") else mn / m1  # > 1: the workers' server is faster
        cell = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in (one, many)]
        print(f"{key:22}{cell[0]:>22}{cell[1]:>22}{ratio:>13.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
