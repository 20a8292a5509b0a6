"""Speed of the embedded engine vs Hugging Face ``generate`` on the same model, side by side in one run.

    python benchmarks/local_engine.py [--tokens 128] [--skip-hf] [--dtype auto] [--threads auto|N]
                                      [--model gemma3-270m --skip-moa]

Prints: single-stream tokens/s, aggregate tokens/s of n=6 in one batch (engine: one
request with shared prefill; HF: num_return_sequences=6), their ratios, and the wall
time of one default Self-MoA answer (6 samples in one batch + 1 aggregation over
them, max_tokens 256 each).  Generation lengths are fixed (EOS ignored) so the
token counts compare.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from archon_server.backends.base import ChatRequest, SamplingParams  # noqa: E402
from archon_server.backends.local import LocalBackend  # noqa: E402
from archon_server.components.prompts import FUSER_SYSTEM  # noqa: E402

PROMPT = [{"role": "user", "content": "Explain how a refrigerator keeps food cold, step by step."}]
MOA_QUESTION = "What are the main causes of the French Revolution? Answer in a few paragraphs."


class Rate:
    """Best tokens per wall-second and per process CPU-second over repeats.

    The CPU-second rate is what a measurement on shared, busy cores can still tell:
    with one thread it approximates the wall rate on one free core.
    """

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def add(self, tokens: int, wall_s: float, cpu_s: float) -> None:
        self.wall = max(self.wall, tokens / wall_s)
        self.cpu = max(self.cpu, tokens / max(cpu_s, 1e-9))

    def __str__(self) -> str:
        return f"{self.wall:7.1f} tok/s ({self.cpu:6.1f} per CPU-s)"


def hf_generate(folder: Path, dtype: torch.dtype, tokens: int, n: int, repeats: int) -> Rate:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if tok.chat_template:
        ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:  # base model: plain completion, as LocalBackend does
        ids = tok(PROMPT[0]["content"], return_tensors="pt")
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, temperature=0.7, num_return_sequences=n)
    with torch.inference_mode():
        model.generate(**ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        rate = Rate()
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = model.generate(**ids, **kw)
            rate.add((out.shape[1] - ids["input_ids"].shape[1]) * n, time.perf_counter() - t0, time.process_time() - c0)
    return rate


async def engine_rate(backend: LocalBackend, tokens: int, n: int, repeats: int) -> Rate:
    params = SamplingParams(temperature=0.7, max_tokens=tokens, n=n, extra={"ignore_eos": True})
    await backend.chat(ChatRequest("m", PROMPT, SamplingParams(max_tokens=8, n=n)))  # warm-up
    rate = Rate()
    for i in range(repeats):
        params.seed = i
        t0, c0 = time.perf_counter(), time.process_time()
        res = await backend.chat(ChatRequest("m", PROMPT, params))
        rate.add(res.usage.completion_tokens, time.perf_counter() - t0, time.process_time() - c0)
    return rate


async def concurrent_rate(backend: LocalBackend, tokens: int, k: int) -> Rate:
    """k separate n=1 requests at once (what a critic layer sends): continuous batching at work."""
    rate = Rate()
    params = [SamplingParams(temperature=0.7, max_tokens=tokens, seed=i, extra={"ignore_eos": True}) for i in range(k)]
    t0, c0 = time.perf_counter(), time.process_time()
    results = await asyncio.gather(*(backend.chat(ChatRequest("m", PROMPT, p)) for p in params))
    rate.add(sum(r.usage.completion_tokens for r in results), time.perf_counter() - t0, time.process_time() - c0)
    return rate


async def self_moa(backend: LocalBackend, max_tokens: int = 256) -> tuple[float, float, int, int, float]:
    """One default Self-MoA answer: 6 samples in one batch, then one aggregation call."""
    user = [{"role": "user", "content": MOA_QUESTION}]
    c0 = time.process_time()
    t0 = time.perf_counter()
    samples = await backend.chat(ChatRequest("m", user, SamplingParams(temperature=0.7, max_tokens=max_tokens, n=6, seed=0)))
    t1 = time.perf_counter()
    refs = "\n".join(f"{i + 1}. {c.text}" for i, c in enumerate(samples.choices))
    agg = [{"role": "system", "content": f"{FUSER_SYSTEM}\n{refs}"}, *user]
    final = await backend.chat(ChatRequest("m", agg, SamplingParams(temperature=0.7, max_tokens=max_tokens, seed=0)))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, samples.usage.completion_tokens, final.usage.prompt_tokens, time.process_time() - c0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", default="auto", help="engine threads (int or auto); HF gets the same int, else all cores")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name or HF folder")
    ap.add_argument("--skip-moa", action="store_true", help="no Self-MoA timing (e.g. for a base model)")
    args = ap.parse_args()
    threads = int(args.threads) if args.threads != "auto" else "auto"

    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (timings on busy cores are slower; see per CPU-s)")
    backend = LocalBackend(args.model, dtype=args.dtype, threads=threads)
    t0 = time.perf_counter()
    await backend.start()
    runner = backend.loaded.runner
    print(f"engine: device={runner.device} dtype={runner.dtype} threads={torch.get_num_threads()} load={time.perf_counter() - t0:.1f}s")
    single = await engine_rate(backend, args.tokens, 1, args.repeats)
    batch6 = await engine_rate(backend, args.tokens, 6, args.repeats)
    print(f"engine   single-stream {single}   n=6 aggregate {batch6}   ({args.tokens} tokens each, threads now {backend.engine.tuner.current})")
    conc = await concurrent_rate(backend, args.tokens, 6)
    print(f"engine   6 concurrent n=1 requests: {conc}   (max batch seen {backend.engine.stats.max_batch_seen})")
    if not args.skip_hf:
        torch.set_num_threads(threads if isinstance(threads, int) else os.cpu_count() or 1)
        hf1 = hf_generate(backend.loaded.path, torch.float32, args.tokens, 1, args.repeats)
        hf6 = hf_generate(backend.loaded.path, torch.float32, args.tokens, 6, args.repeats)
        print(f"HF fp32  single-stream {hf1}   n=6 aggregate {hf6}   (threads {torch.get_num_threads()})")
        print(f"ratio engine/HF (wall): single {single.wall / hf1.wall:.2f}x   n=6 {batch6.wall / hf6.wall:.2f}x")
        print(f"ratio engine/HF (CPU):  single {single.cpu / hf1.cpu:.2f}x   n=6 {batch6.cpu / hf6.cpu:.2f}x")
    if args.skip_moa:
        print(f"engine stats: {backend.stats()}")
        await backend.close()
        return
    s, a, stoks, aprompt, cpu = await self_moa(backend)
    print(f"Self-MoA (6 samples + 1 aggregation, max_tokens 256): {s + a:.1f}s wall, {cpu:.1f} CPU-s  (samples {s:.1f}s, "
          f"{stoks} tokens; aggregation {a:.1f}s with a {aprompt}-token prompt)")
    print(f"engine stats: {backend.stats()}")
    await backend.close()


if __name__ == "__main__":
    asyncio.run(main())
