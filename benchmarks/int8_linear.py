"""int8 weight-only GEMM vs float32 ``F.linear`` on this CPU, at the row counts decoding meets.

    python benchmarks/int8_linear.py [--threads 2] [--rows 1,6,12]

The engine keeps int8 copies of its weights for small decode batches only where they pay (bf16 on AVX512-BF16);
this prints, for SmolLM2-135M's projection shapes and LM head, the time of one pass through all of them with
each kernel, side by side in one run, so the choice can be checked on another machine.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# SmolLM2-135M: q/o (576x576), k/v (192x576), gate/up (1536x576), down (576x1536), LM head (49152x576)
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]


def timed(fn, reps: int = 200) -> float:  # type: ignore[no-untyped-def]
    for _ in range(20):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,6,12")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {a.threads} threads; ms for one pass over {len(SHAPES)} shapes")
    for rows in (int(r) for r in a.rows.split(",")):
        f32 = i8 = 0.0
        for out, inn in SHAPES:
            w = torch.randn(out, inn)
            scale = w.abs().amax(1) / 127
            q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            x = torch.randn(rows, inn)
            f32 += timed(lambda: F.linear(x, w))
            i8 += timed(lambda: torch._weight_int8pack_mm(x, q, scale))
        print(f"rows {rows:3d}: float32 F.linear {f32 * 1e3:7.3f} ms | int8 weight-only {i8 * 1e3:7.3f} ms | int8/float32 {i8 / f32:5.2f}x")


if __name__ == "__main__":
    main()
