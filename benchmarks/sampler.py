"""Token sampler: the engine's inverse-CDF ``draw`` vs ``torch.multinomial``, side by side in one run.

    python benchmarks/sampler.py [--tokens 96] [--repeats 3]

Prints the cost of one draw over SmolLM2's 49,152-token vocabulary with each sampler, then
the engine's sampled decoding (temperature 0.7, EOS ignored) single-stream and n=6 in one
batch with each sampler swapped in, alternating A/B per repeat so load on the shared cores
hits both alike, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from local_engine import Rate, engine_rate  # noqa: E402

from archon_server.backends.local import LocalBackend  # noqa: E402
from archon_server.engine import sampling  # noqa: E402

INVERSE_CDF = sampling.draw


def multinomial(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def per_draw_ms(fn, vocab: int = 49152, reps: int = 300) -> float:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(vocab, generator=g) * 3, -1)
    fn(p, g)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(p, g)
    return (time.perf_counter() - t0) / reps * 1e3


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    a, b = per_draw_ms(INVERSE_CDF), per_draw_ms(multinomial)
    print(f"one draw over 49,152 tokens: inverse CDF {a:.3f} ms, torch.multinomial {b:.3f} ms ({b / a:.1f}x)")
    backend = LocalBackend("smollm2-135m-instruct")
    await backend.start()
    rates = {name: {n: Rate() for n in (1, 6)} for name in ("inverse_cdf", "multinomial")}
    for _ in range(args.repeats):
        for name, fn in (("inverse_cdf", INVERSE_CDF), ("multinomial", multinomial)):
            sampling.draw = fn  # sample_rows looks the sampler up in its module at call time
            for n in (1, 6):
                r = await engine_rate(backend, args.tokens, n, 1)
                rates[name][n].add(1, 1 / r.wall, 1 / r.cpu)  # keep each rate's best over repeats
    sampling.draw = INVERSE_CDF
    for n in (1, 6):
        new, old = rates["inverse_cdf"][n], rates["multinomial"][n]
        print(f"engine n={n}: inverse CDF {new}   multinomial {old}   ratio {new.wall / old.wall:.2f}x wall, "
              f"{new.cpu / old.cpu:.2f}x per CPU-s")
    await backend.close()


if __name__ == "__main__":
    asyncio.run(main())
