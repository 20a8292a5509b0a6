"""The decode step's weight products on this CPU, each kernel the engine can choose, at the row counts decoding meets.

    python benchmarks/decode_linears.py [--threads 1,2] [--rows 1,2,4,6,12,16]

A decode step multiplies a few token rows by every weight of the model, so it is bound by reading the weights
from memory.  This times one pass over all of SmolLM2-135M's decode weights (30 layers' fused QKV, O, fused
gate/up and down projections, and the LM head: distinct tensors, so they come from memory as in decoding; one
matrix timed alone sits in the cache and misleads) with each kernel, side by side in one run:

- ``float32``: ``F.linear`` (MKL); ``packed``: oneDNN with the weight packed once (``runner.pack_for_decode``);
- ``int8``: weight-only int8 (``torch._weight_int8pack_mm``, float32 activations; the bf16 hosts' small-batch
  weights); ``fp16``: FBGEMM's float16 weights with float32 activations (``runner.fp16_linear``; the float32
  hosts' small-batch weights).

The engine measures the same choice at load (``ModelRunner._make_packed``); this shows it on another machine.
Milliseconds per pass, best of 3 rounds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from archon_server.engine.runner import fp16_linear, int8_linear, pack_fp16, pack_for_decode, packed_linear, quantize_int8

# SmolLM2-135M as the engine holds it: fused q/k/v (960x576), o (576x576), fused gate/up (3072x576), down
# (576x1536) per layer, 30 layers, and the LM head (49152x576).
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
SHAPES = LAYER * 30 + [(49152, 576)]


def best_ms(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", default="1,2,4,6,12,16")
    a = ap.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * 0.02 for o, i in SHAPES]
    keys = {id(w): w for w in weights}
    int8 = quantize_int8(keys, torch.float32)
    fp16 = pack_fp16(keys)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"ms for one pass over {len(SHAPES)} weights ({sum(o * i for o, i in SHAPES) / 1e6:.0f}M parameters)")
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in (int(r) for r in a.rows.split(",")):
            xs = {n: torch.randn(rows, n) for n in (576, 1536)}
            packed = {id(w): pack_for_decode(w, rows) for w in weights}
            kernels: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {"float32": F.linear}
            if all(p is not None for p in packed.values()):
                kernels["packed"] = lambda x, w: packed_linear(x, packed[id(w)])
            if int8:
                kernels["int8"] = lambda x, w: int8_linear(x, *int8[id(w)])
            if fp16:
                kernels["fp16"] = lambda x, w: fp16_linear(x, fp16[id(w)])
            with torch.inference_mode():
                cells = {name: best_ms(lambda k=k: [k(xs[w.shape[1]], w) for w in weights]) for name, k in kernels.items()}
            line = " | ".join(f"{name} {ms:6.1f}" for name, ms in cells.items())
            print(f"{threads} thread(s), rows {rows:3d}: {line}", flush=True)


if __name__ == "__main__":
    main()
