"""The model runner: a minimal Llama-family forward pass over a slot-based KV cache.

Why not ``transformers``' forward: for a 135M model on a CPU the per-step Python and
mask-building overhead of the generic forward costs more than the matmuls.  This
forward has ~12 tensor ops per layer, fused QKV and gate/up projections, a KV cache
preallocated per *slot* (one slot = one sequence), and per-row positions, so rows of
different lengths decode together without padding the inputs.

The same entry point serves prefill (one row, T prompt tokens), batched decode (B
rows, 1 token each) and speculative verification (B rows, T draft tokens each):
:meth:`ModelRunner.forward` writes K/V at each row's own position and attends to
everything before it.  Rolling back rejected draft tokens is just lowering
``cache.lengths[slot]`` (:meth:`KVCache.crop`); stale entries past a row's length are
masked out and overwritten later.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from ..exceptions import KVCacheFull
from .kernel_choices import KernelChoices, cpu, fingerprint, machine_fingerprint


@dataclass(frozen=True)
class LlamaDims:
    """Shape and variant of a Llama-family decoder (Llama/SmolLM2, Qwen2, Mistral, Gemma 3 text)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    tie_embeddings: bool
    # Gemma 3 differences (defaults = plain Llama)
    family: str = "llama"
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden)
    norm_offset: float = 0.0  # Gemma RMSNorm scales by (1 + w)
    qk_norm: bool = False  # RMSNorm on each query/key head before RoPE
    sandwich_norms: bool = False  # extra norms after attention and after the MLP
    activation: str = "silu"  # or "gelu_tanh"
    attn_scale: float | None = None  # None: head_dim ** -0.5
    windows: tuple[int | None, ...] = ()  # per layer: sliding window or None (full attention)
    layer_rope_theta: tuple[float, ...] = ()  # per layer RoPE base (Gemma: local 10k, global 1M)

    @classmethod
    def from_config(cls, cfg: dict) -> "LlamaDims":
        mt = cfg.get("model_type")
        if mt not in ("llama", "mistral", "qwen2", "gemma3_text") or cfg.get("rope_scaling"):
            raise NotImplementedError(f"model_type {mt!r} is not supported by the local engine")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        n_layers = cfg["num_hidden_layers"]
        base = dict(
            vocab=cfg["vocab_size"],
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            layers=n_layers,
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_eps=cfg.get("rms_norm_eps", 1e-5),
            max_positions=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
        )
        if mt != "gemma3_text":
            if rope.get("rope_type", "default") != "default":
                raise NotImplementedError(f"rope_type {rope.get('rope_type')!r} is not supported")
            theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
            window = cfg.get("sliding_window") if cfg.get("use_sliding_window") or mt == "mistral" else None
            return cls(rope_theta=theta, windows=(window,) * n_layers, layer_rope_theta=(theta,) * n_layers, **base)
        types = cfg.get("layer_types") or ["full_attention"] * n_layers
        thetas = []
        for t in types:
            r = rope.get(t, rope) if isinstance(rope.get(t), dict) else rope
            if r.get("rope_type", "default") != "default":
                raise NotImplementedError(f"rope_type {r.get('rope_type')!r} is not supported")
            thetas.append(float(r.get("rope_theta", cfg.get("rope_local_base_freq" if t == "sliding_attention" else "rope_theta", 10000.0))))
        if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
            raise NotImplementedError("logit soft-capping is not supported")
        return cls(
            rope_theta=thetas[-1],
            family="gemma3",
            embed_scale=cfg["hidden_size"] ** 0.5,
            norm_offset=1.0,
            qk_norm=True,
            sandwich_norms=True,
            activation="gelu_tanh",
            attn_scale=cfg.get("query_pre_attn_scalar", base["head_dim"]) ** -0.5,
            windows=tuple(cfg.get("sliding_window") if t == "sliding_attention" else None for t in types),
            layer_rope_theta=tuple(thetas),
            **base,
        )


class KVCache:
    """K/V of every layer for up to ``slots`` sequences of up to ``capacity`` tokens.

    Storage is ``[layers, slots, kv_heads, capacity, head_dim]``; both dimensions grow
    geometrically on demand (rare copies) so an idle engine holds little memory.
    ``lengths[s]`` is how many positions of slot ``s`` are valid.

    The rule for its tensors: they are *inference tensors*, allocated and written only inside
    ``torch.inference_mode()``, and every method that allocates or writes enters it itself.  So a
    cache is the same kind of tensor however it was grown (by the forward pass, by an admission's
    ``reserve``, by a copy) and whoever calls it (the engine's worker, which also runs its whole loop
    in inference mode; a test; the speculative-decoding tools).  Mixing kinds was issue #14: the
    forward grew the cache into inference tensors, and a later ``copy_slot`` outside inference mode
    failed on them for every ``n>1`` request until restart.
    """

    @torch.inference_mode()
    def __init__(self, dims: LlamaDims, dtype: torch.dtype, device: torch.device, slots: int = 1, capacity: int = 256,
                 budget: int | None = None):
        """``budget``: most bytes the K and V tensors may take (None: no limit); :meth:`reserve` grows within it or
        raises :class:`~archon_server.exceptions.KVCacheFull` without allocating."""
        self.dims = dims
        self.dtype = dtype
        self.device = device
        self.budget = budget
        self._position_bytes = 2 * dims.layers * dims.kv_heads * dims.head_dim * dtype.itemsize
        shape = (dims.layers, slots, dims.kv_heads, capacity, dims.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * slots

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @torch.inference_mode()
    def reserve(self, slots: int, capacity: int, in_use: int | None = None) -> None:
        """Grow to at least ``slots`` x ``capacity`` (keeps contents).

        ``in_use``: how many leading slots hold sequences (the caller knows; default: all).  When the capacity grows
        the cache is copied anyway, and the copy keeps only those and the ``slots`` asked for.  Why: every slot is
        as long as the longest, so slots left over from a wide batch grew with each long prompt: on the default
        server, after an n=8 request, an n=2 answer to a 3,635-token prompt beside two decoding rows grew all 8
        SmolLM2 slots (2.6 GB of cache) where 4 were in use; a 30,000-token prompt alone on gemma3 would take 8
        slots (8.8 GB) where one (1.1 GB) holds it.
        """
        capacity = min(capacity, self.dims.max_positions)
        if slots <= self.slots and capacity <= self.capacity:
            return
        floor = self.slots
        new_cap = self.capacity
        if capacity > new_cap:
            new_cap = self.round_capacity(max(capacity, 2 * new_cap))
            if in_use is not None:
                floor = max(in_use, slots, 1)
        new_slots = floor if slots <= floor else max(slots, 2 * self.slots)
        if self.budget is not None and self.bytes_for(new_slots, new_cap) > self.budget:
            new_slots, new_cap = self._within_budget(self.budget, slots, capacity, in_use, new_cap)
        shape = (self.dims.layers, new_slots, self.dims.kv_heads, new_cap, self.dims.head_dim)
        kept = min(new_slots, self.slots)
        upto = min(new_cap, self.capacity)  # (within the budget the capacity may shrink to what the kept slots hold)
        # Both new tensors are filled before either replaces the old: a failed allocation leaves the cache as it was.
        grown = []
        for old in (self.k, self.v):
            new = torch.zeros(shape, dtype=self.dtype, device=self.device)
            new[:, :kept, :, :upto] = old[:, :kept, :, :upto]
            grown.append(new)
        self.k, self.v = grown
        held = kept if in_use is None else min(in_use, kept)  # (a slot past those in use holds nothing to keep)
        self.lengths = self.lengths[:held] + [0] * (new_slots - held)

    def bytes_for(self, slots: int, capacity: int) -> int:
        """What K and V take at ``slots`` x ``capacity`` positions."""
        return slots * capacity * self._position_bytes

    def round_capacity(self, capacity: int) -> int:
        """Capacities are whole multiples of 64 positions (the prefix cache's 32-token grid fits), at most the context."""
        return min(-(-capacity // 64) * 64, self.dims.max_positions)

    def _within_budget(self, budget: int, slots: int, capacity: int, in_use: int | None, wanted_cap: int) -> tuple[int, int]:
        """The shape to grow to when the usual one (slots and capacity doubled, idle slots kept) is past the budget:
        only the slots in use (all, when the caller does not say) and those asked for, and the largest capacity
        the budget allows up to ``wanted_cap``, if that holds ``capacity`` and what the kept slots hold."""
        keep = self.slots if in_use is None else min(in_use, self.slots)
        new_slots = max(slots, keep, 1)
        # (only the kept slots' lengths count: a slot past them may hold a finished row's stale length)
        need = self.round_capacity(max([capacity] + self.lengths[:keep]))
        most = budget // self.bytes_for(new_slots, 1) // 64 * 64
        if most < need:
            raise KVCacheFull(f"{new_slots} sequence slot(s) of {need:,} positions", self.bytes_for(new_slots, need), budget)
        return new_slots, max(need, min(wanted_cap, most))

    @torch.inference_mode()
    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """Duplicate a sequence's K/V (shared prefill: one prompt, n samples)."""
        n = self.lengths[src] if length is None else length
        # inference_mode: the cache tensors are inference tensors, and this runs outside a model step too
        # (compaction after a cancelled stream: an in-place write there used to fail the whole batch)
        with torch.inference_mode():
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def move_slot(self, src: int, dst: int) -> None:
        """Move a sequence to another slot (keeps active rows contiguous: views, not gathers; a copy)."""
        if src != dst:
            self.copy_slot(src, dst)
            self.lengths[src] = 0

    def crop(self, slot: int, length: int) -> None:
        """Roll a sequence back to ``length`` tokens (rejected speculative tokens): bookkeeping only,
        no tensor is touched (stale entries past the length are masked, then overwritten)."""
        if length > self.lengths[slot]:
            raise ValueError("crop can only shorten a sequence")
        self.lengths[slot] = length

    def consistent(self) -> bool:
        """K and V agree in shape and every slot's length fits (checked after an engine failure)."""
        return self.k.shape == self.v.shape and len(self.lengths) == self.slots and all(0 <= n <= self.capacity for n in self.lengths)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, T', vocab] float32 (T' = 1 when only the last position was asked)
    hidden: torch.Tensor  # [B, T, hidden] final-norm hidden states (draft heads read these)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def best_times(candidates: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Best of ``repeats`` timed runs of each candidate (after one untimed warm-up run), in seconds.

    The engine's kernel choices are measured at load, not assumed: which one wins differs between CPUs
    (int8 weights beat bf16 up to ~14 rows on one AMD EPYC, and only up to 2-3 on another of the same
    family against packed bf16).  The candidates' runs alternate (round by round, the order rotating), so a
    burst of other work on the cores slows a run of each rather than every run of one. Timed one candidate
    after the other, a burst as long as one candidate's runs (2 passes of ~17 ms for the packed weights) decided
    for the other, and the choice is remembered (:mod:`.kernel_choices`): on a 2-core AMX Xeon, where the packed
    weights win by 1.4x alone (16-17 against 23-25 ms a pass), they lost their timing in two CI runs, one of them
    beside other jobs on the cores."""
    for fn in candidates.values():
        fn()  # warm-up (first-call allocations, oneDNN's primitive cache)
    names = list(candidates)
    best = dict.fromkeys(names, float("inf"))
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            candidates[name]()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu()[1])


@functools.cache
def _cpu_has_amx() -> bool:
    return "amx_bf16" in cpu()[1]


def _bf16_faster_on_cpu(hidden: int = 576, out: int = 1728, rows: int = 6) -> bool:
    """Time one decode-shaped matmul in both dtypes (best of several, ~30 ms in all).

    On AVX512-BF16 CPUs oneDNN's bf16 GEMM is ~3x faster than MKL's fp32 at small
    batch here (half the weight bytes per step; fp32 small-M GEMMs also suffer badly
    when the cores are shared); elsewhere bf16 is emulated and slower.
    """
    if not _cpu_has_bf16():
        return False
    def ten(dt: torch.dtype) -> Callable[[], None]:
        x, w = torch.randn(rows, hidden, dtype=dt), torch.randn(out, hidden, dtype=dt)
        return lambda: [F.linear(x, w) for _ in range(10)]  # type: ignore[func-returns-value]

    best = best_times({"fp32": ten(torch.float32), "bf16": ten(torch.bfloat16)}, 5)
    return best["bf16"] < best["fp32"]


def pick_dtype(dtype: str, device: torch.device, before_timing: Callable[[], object] | None = None) -> torch.dtype:
    """``auto``: bf16 on CUDA; on CPU bf16 where measured faster than float32 (AVX512-BF16), else float32.
    ``before_timing``: called first where that is measured (see :class:`.kernel_choices.KernelChoices`)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if not _cpu_has_bf16():
            return torch.float32
        # Remembered per machine, as the kernel choices are: a bf16 host timed it at every load (~30 ms, and the
        # tokenizer's load had to finish first).
        choices = KernelChoices(machine_fingerprint(), before_timing)
        bf16 = choices.get("bf16", _bf16_faster_on_cpu)
        choices.save()
        return torch.bfloat16 if bf16 else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    try:
        return table[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}") from None


def onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` through oneDNN (the op torch's own compiler emits for CPU linears)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def onednn_faster(w: torch.Tensor, rows: int = 8, choices: KernelChoices | None = None) -> bool:
    """Whether oneDNN's float32 GEMM beats the default (MKL's) on a decode-shaped product with ``w``.

    Why: ``F.linear`` on float32 CPU tensors calls MKL, whose small-M GEMM reads the weights at about
    half the memory bandwidth oneDNN reaches on some CPUs (measured on the 2-core AMD EPYC (AVX2) these
    machines have: the 135M model's projections and LM head 1.4x faster at 1-16 rows, equal from ~256);
    a decode step is bound by reading the weights.  Measured, not assumed (best of several, ~0.1-0.3 s; once per
    machine with ``choices``); False where the op is missing or disagrees with ``F.linear`` (checked at every call).
    """
    if w.device.type != "cpu" or w.dtype != torch.float32 or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    x = torch.randn(rows, w.shape[1], dtype=w.dtype)
    try:
        if not torch.allclose(onednn_linear(x, w), F.linear(x, w), rtol=1e-3, atol=1e-3):
            return False
    except (RuntimeError, NotImplementedError):
        return False

    def measure() -> bool:
        best = best_times({"mkl": lambda: F.linear(x, w), "onednn": lambda: onednn_linear(x, w)}, 4)
        return best["onednn"] < 0.9 * best["mkl"]

    return choices.get("onednn", measure) if choices is not None else measure()


def pack_for_decode(w: torch.Tensor, rows: int = 6) -> torch.Tensor | None:
    """oneDNN's blocked copy of ``w`` for :func:`packed_linear`, laid out for products of about ``rows`` rows.

    Why: ``F.linear`` (and :func:`onednn_linear` on a plain weight) reorders the weight into oneDNN's blocked
    layout inside every call, so a decode step reads each weight twice and writes it once; a weight packed
    once at load skips that.  Measured on the 2-core AVX512-BF16 AMD EPYC (SmolLM2, 2 threads, whole decode
    steps): 6 rows 38 -> 23 ms, 16 rows 56 -> 41 ms; float32 over the same shapes, 6 rows 36 -> 20 ms.  Costs a
    second copy of every packed weight.  None where this torch build lacks the op or the copy does not give
    ``F.linear``'s result."""
    if w.device.type != "cpu" or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        x = torch.randn(rows, w.shape[1], dtype=w.dtype)
        if not torch.allclose(packed_linear(x, packed).float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2):
            return None
    except (RuntimeError, NotImplementedError):
        return None
    return packed


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a weight from :func:`pack_for_decode`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def quantize_int8(weights: dict, dtype: torch.dtype) -> dict:
    """Per-output-channel int8 copies ``{key: (q, scale)}`` of ``weights`` ({key: [out, in]}) for
    :func:`int8_linear`; empty when this torch build has no working int8 GEMM kernel (a private
    op, so it is probed before anyone relies on it)."""
    if not weights or not hasattr(torch, "_weight_int8pack_mm"):
        return {}
    table = {}
    for key, w in weights.items():
        wf = w.detach().float()
        scale = (wf.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        q = (wf / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        table[key] = (q, scale.to(dtype))
    q, sc = next(iter(table.values()))
    try:
        torch._weight_int8pack_mm(torch.zeros(1, q.shape[1], dtype=dtype, device=q.device), q, sc)
    except (RuntimeError, NotImplementedError):
        return {}
    return table


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (q * scale).T + bias`` with the int8 weight-only GEMM (x in ``scale``'s dtype)."""
    y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), q, scale).view(*x.shape[:-1], q.shape[0])
    return y + bias if bias is not None else y


def pack_fp16(weights: dict) -> dict:
    """FBGEMM's packed float16 copies ``{key: packed}`` of float32 ``weights`` ({key: [out, in]}) for
    :func:`fp16_linear`; empty where this torch build or CPU lacks the kernel or it disagrees with
    ``F.linear`` over the same float16-rounded weights.

    Why: on a CPU without AVX512-BF16 the engine computes in float32 (bf16 is emulated there, and oneDNN's
    bf16/fp16 products need AVX512 or AVX-NE-CONVERT), and a decode step is bound by reading 4 bytes per
    weight.  FBGEMM's fp16-weight GEMM reads 2 and converts in registers (F16C), keeping float32
    activations and sums: only the weights are rounded (relative 2**-11, the fp16 mantissa; int8 on the
    bf16 hosts rounds to 2**-7 of a row's largest weight).  Measured on the 2-core AMD EPYC (AVX2 only),
    SmolLM2-135M's whole decode pass: 1 row 20.5 ms against 43.1 for oneDNN's packed float32, 6 rows 28.5
    against 47.7 (2 threads); 21.7 against 49.6 and 32.3 against 79.7 on 1 thread, which then is as fast as 2
    (``python benchmarks/decode_linears.py``).  Greedy answers to 24 AlpacaEval prompts: 22 the same as float32's
    over 96 tokens, and the same mean log-likelihood of float32's answers to 4 decimals.
    The op is a public torch function marked deprecated since torch 2.x (as is all of ``torch.ao``'s
    eager quantization); the probe here makes its removal a fallback to float32, not an error.
    """
    if not weights or not hasattr(torch, "fbgemm_pack_gemm_matrix_fp16"):
        return {}
    def pack(w: torch.Tensor) -> torch.Tensor:
        # Rounded to fp16 values first by torch's vectorized cast: FBGEMM's own scalar rounding took 1.7x as long.
        return torch.fbgemm_pack_gemm_matrix_fp16(w.detach().to(torch.float16).float().contiguous())

    table = {}
    with warnings.catch_warnings():  # the deprecation notice (printed once per process, at the first call)
        warnings.simplefilter("ignore")
        try:
            # Packing runs in one thread per core (the op releases the GIL): ~1 s for SmolLM2 on 2 cores, 2.7 serially.
            with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
                table = dict(zip(weights, pool.map(pack, weights.values())))
            w = next(iter(weights.values())).detach().float()
            x = torch.randn(3, w.shape[1])
            if not torch.allclose(fp16_linear(x, table[next(iter(weights))]), F.linear(x, w.half().float()),
                                  rtol=1e-3, atol=1e-4):
                return {}
        except (RuntimeError, NotImplementedError):
            return {}
    return table


def fp16_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a weight from :func:`pack_fp16` (float32 in and out)."""
    return torch.fbgemm_linear_fp16_weight_fp32_activation(x, packed, bias)


R = TypeVar("R")

# Attention grid of every prefill (the prefix cache's block size): see ModelRunner._attend_on_grid.
PREFILL_GRID = 32

# Most token rows one product with the small-batch weights takes (a speculative verification of k <= 15
# drafted tokens).
SMALL_MAX_TOKENS = 16

# Most queries per KV head (head groups x tokens) that attend by :func:`attend_by_products` when the cache is
# float32 (a decode step, a short verification); more go through SDPA.
PRODUCT_ATTENTION_MAX_QUERIES = 16

# Fewest rows for which a GEMM's per-row sums run in the same order as in any larger one (see row_exact_linear).
EXACT_MIN_ROWS = 16
# Rows of every bf16 product of row_exact_linear on a CPU with AMX (see there).
EXACT_AMX_ROWS = 128


def row_exact_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                     packed: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose every row has the same bits however many rows are in ``x``.

    Why: a GEMM library picks its kernel by the row count, and the kernels sum in other orders. Measured on the
    2-core AMD EPYC (AVX2, float32, MKL through ``F.linear``): 1-3, 5-7 and 9-11 rows give other last bits than the
    same rows inside 512; from 12 rows on every count agrees, at 1 and 2 threads (oneDNN differs at 1 row, and
    from MKL at any count). The engine's prefill cuts a prompt into chunks whose size changes with load and with
    prefix-cache hits (a short tail after a hit), so a short chunk is padded with zero rows to
    :data:`EXACT_MIN_ROWS` and always goes through the same library: a cached prefix is then bit-identical to one
    computed in place. The padding costs at most 15 rows of a GEMM, once per chunk.

    bf16 on a CPU with AMX (oneDNN's AMX kernels) has no such count: on a 2-core Xeon with AMX, 2-32 rows and 33-700
    rows each gave other bits than the same rows inside 1,100, and where counts begin to agree depends on the
    weight's shape (55 rows for a 192 x 576 product); the prefix cache's hits then differed from the prompt computed
    in place. There every product is cut into blocks of exactly :data:`EXACT_AMX_ROWS` rows (the last padded), whose
    bits were the same for any row at any place in its block, at 1 and 2 threads: exact by construction. Its cost,
    measured there (2 threads): SmolLM2's four product shapes on a 512-row chunk 2.9 ms instead of 1.45, on a 32-row
    one 0.85 instead of 0.27 (blocks of 64: 3.8 and 0.57; of 32: 5.5 and 0.37); a 1,700-token prompt's whole prefill
    1.5 s instead of 1.0 (blocks of 64: 1.4; of 32: 1.6), a 4,800-token one 5.5 instead of 4.8 (5.8; 6.3). With
    ``packed`` (the weight's :func:`pack_for_decode` copy) the blocks skip ``F.linear``'s reorder of the weight in
    every call: the 512-row chunk's products 1.8 ms instead of 2.5 (1.15 whole), as exact.
    """
    rows = x.numel() // x.shape[-1]
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _cpu_has_amx():
        block = EXACT_AMX_ROWS
        flat = x.reshape(rows, x.shape[-1])
        if rows % block:
            flat = torch.cat([flat, flat.new_zeros(block - rows % block, x.shape[-1])])
        def lin(part: torch.Tensor) -> torch.Tensor:
            return F.linear(part, w, bias) if packed is None else packed_linear(part, packed, bias)

        out = torch.cat([lin(part) for part in flat.split(block)]) if len(flat) > block else lin(flat)
        return out[:rows].view(*x.shape[:-1], w.shape[0])
    if rows >= EXACT_MIN_ROWS:
        return F.linear(x, w, bias)
    flat = x.reshape(rows, x.shape[-1])
    padded = torch.cat([flat, flat.new_zeros(EXACT_MIN_ROWS - rows, x.shape[-1])])
    return F.linear(padded, w, bias)[:rows].view(*x.shape[:-1], w.shape[0])


class ModelRunner:
    """Weights + forward pass of one model.  Not thread-safe: one worker owns it."""

    def __init__(
        self,
        folder: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        small_weights: str = "auto",
        kv_dtype: str = "auto",
        weights_loaded: Callable[[], object] | None = None,
        before_timing: Callable[[], object] | None = None,
    ):
        """``small_weights``: also keep compact copies of the weights and use them for steps of at most
        :attr:`small_max_rows` token rows where they were measured faster: ``"int8"`` (weight-only int8,
        :func:`int8_linear`), ``"fp16"`` (FBGEMM's float16 weights, :func:`fp16_linear`; float32 weights
        only), ``"none"``; ``"auto"``: int8 on CPU in bf16, fp16 on CPU when ``dtype="auto"`` fell to
        float32 (an explicit ``"float32"`` stays float32 throughout), where the kernel exists.
        ``kv_dtype``: KV cache / attention dtype; ``"auto"``: the weights' dtype (float32 KV was
        measured no faster on CPU: long-context decode is bound by reading K/V, and bf16 halves it).
        ``weights_loaded``: called once the weights are in memory, before their copies are packed (GIL-free
        kernels, most of a load): :func:`~.loader.load_model` starts loading the tokenizer there.
        ``before_timing``: called once before the first kernel timing (none on a load whose choices are remembered):
        :func:`~.loader.load_model` waits there for the tokenizer."""
        from safetensors.torch import load_file

        self.folder = Path(folder)
        cfg = json.loads((self.folder / "config.json").read_text())
        self.config = cfg
        self.dims = d = LlamaDims.from_config(cfg)
        self.device = pick_device(device)
        if self.device.type == "cuda":
            # cuDNN attention builds a graph for every new sequence length (40-60 ms on an H100,
            # torch 2.11): decoding meets a new length at every step.  Flash/mem-efficient don't.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.dtype = pick_dtype(dtype, self.device, before_timing)
        if kv_dtype == "auto":
            self.kv_dtype = self.dtype
        else:
            self.kv_dtype = pick_dtype(kv_dtype, self.device)
        sd = load_file(str(self.folder / "model.safetensors"), device="cpu")

        def w(name: str) -> torch.Tensor:
            return sd[name].to(device=self.device, dtype=self.dtype).contiguous()

        def norm(name: str) -> torch.Tensor:
            # Norm weights stay float32: the RMS statistics are computed in float32 (as HF does).
            # Gemma's (1 + w) is folded in here once.
            return sd[name].to(device=self.device, dtype=torch.float32) + d.norm_offset

        self.embed = w("model.embed_tokens.weight")
        self.lm_head = self.embed if d.tie_embeddings or "lm_head.weight" not in sd else w("lm_head.weight")
        self.final_norm = norm("model.norm.weight")
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(d.layers):
            p = f"model.layers.{i}."
            qkv = torch.cat([sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"]])
            layer = {
                "attn_norm": norm(p + "input_layernorm.weight"),
                "qkv": qkv.to(device=self.device, dtype=self.dtype).contiguous(),
                "o": w(p + "self_attn.o_proj.weight"),
                "gate_up": torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
                .to(device=self.device, dtype=self.dtype)
                .contiguous(),
                "down": w(p + "mlp.down_proj.weight"),
            }
            if d.sandwich_norms:  # Gemma: post_attention_layernorm normalizes the attention *output*
                layer["post_attn_norm"] = norm(p + "post_attention_layernorm.weight")
                layer["mlp_norm"] = norm(p + "pre_feedforward_layernorm.weight")
                layer["post_mlp_norm"] = norm(p + "post_feedforward_layernorm.weight")
            else:
                layer["mlp_norm"] = norm(p + "post_attention_layernorm.weight")
            if d.qk_norm:
                layer["q_norm"] = norm(p + "self_attn.q_norm.weight")
                layer["k_norm"] = norm(p + "self_attn.k_norm.weight")
            biases = [sd.get(p + f"self_attn.{b}_proj.bias") for b in ("q", "k", "v")]
            if all(b is not None for b in biases):  # qwen2-style attention bias
                layer["qkv_bias"] = torch.cat(biases).to(device=self.device, dtype=self.dtype)  # type: ignore[arg-type]
            self.layers.append(layer)
        del sd
        # One RoPE table per distinct base (Gemma 3 alternates local and global layers): cos, and sin with the
        # rotation's sign folded into its first half (see :meth:`_rope`).
        self.rope: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        half = d.head_dim // 2
        for theta in sorted(set(d.layer_rope_theta)):
            inv_freq = 1.0 / (theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.float32) / d.head_dim))
            freqs = torch.outer(torch.arange(d.max_positions, dtype=torch.float32), inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            sin = emb.sin().to(self.device, self.dtype)
            self.rope[theta] = (emb.cos().to(self.device, self.dtype), torch.cat([-sin[:, :half], sin[:, half:]], dim=-1))
        self.scale = d.attn_scale if d.attn_scale is not None else 1.0 / math.sqrt(d.head_dim)
        self.forward_calls = 0
        # Decode attention whose bits do not depend on the thread count (attend_by_products): float32 caches on a CPU.
        # A bfloat16 cache keeps SDPA (its float32 sums; such a step's bits already move with the batch).
        self.product_attention = self.device.type == "cpu" and self.kv_dtype == torch.float32
        self.shared_attention = self.device.type == "cpu" and _flash_with_lse_works()
        self.small_max_rows = 12  # measured crossover of int8 with plain bf16 GEMMs: ~14-16 rows (1 core); see _make_packed
        # Compact copies of the decode weights for small batches: {id(weight): int8 (q, scale) or fp16 packed}.
        self.small: dict[int, Any] = {}
        self.small_kind = ""  # "int8", "fp16", or "" when there are none
        if weights_loaded is not None:
            weights_loaded()
        kind = small_weights
        if kind == "auto":
            cpu = self.device.type == "cpu"
            kind = ("int8" if cpu and self.dtype == torch.bfloat16
                    else "fp16" if cpu and dtype == "auto" and self.dtype == torch.float32 else "none")
        if kind not in ("int8", "fp16", "none"):
            raise ValueError(f"unknown small_weights {small_weights!r}")
        if kind == "int8":
            self._make_int8()
        elif kind == "fp16" and self.dtype == torch.float32:
            table = pack_fp16({id(w): w for w in self._decode_weights()})
            if table:
                self.small, self.small_kind = table, "fp16"
        # Timed kernel choices, remembered per machine (.kernel_choices): measured at the first load only.
        choices = KernelChoices(fingerprint(self.folder / "model.safetensors", self.dtype, self.small_kind),
                                before_timing) if self.device.type == "cpu" else None
        # Token rows up to which linears go through oneDNN (decode steps, verification); 0: never.
        self.onednn_max_rows = 64 if choices is not None and onednn_faster(self.lm_head, choices=choices) else 0
        # Products of at most this many rows (decode steps, verification) use weights packed once at load
        # (:func:`pack_for_decode`) where that was measured faster; int8 then keeps only the row counts it wins.
        self.packed: dict[int, torch.Tensor] = {}
        self.packed_max_rows = 64
        if choices is not None:
            self._make_packed(choices)
            choices.save()

    def _make_int8(self) -> None:
        """Per-output-channel int8 copies of every projection and the LM head.

        Why: a one-sequence decode step on a CPU is bound by reading the weights; int8
        halves the bytes: whole decode steps measured 1.8x faster at 1 row, 1.35x at 6,
        even at 12, slower from ~16 rows (prefill chunks keep bf16).  The extra rounding
        (<= 0.4% of a row's largest weight) is small next to the Q4 source's; greedy
        output matched float32 on the test prompts.
        """
        table = quantize_int8({id(w): w for w in self._decode_weights()}, self.dtype)
        if table:
            self.small, self.small_kind = table, "int8"

    def _decode_weights(self) -> list[torch.Tensor]:
        """The matrices a decode step multiplies by: every projection and the LM head."""
        return [self.lm_head] + [L[k] for L in self.layers for k in ("qkv", "o", "gate_up", "down")]

    def _make_packed(self, choices: KernelChoices) -> None:
        """Pack the decode weights (:func:`pack_for_decode`) and keep them if a pass over all of them at 6 rows
        beats the plain path; then narrow :attr:`small_max_rows` to the row counts where the small-batch
        weights still win. Both answers come from ``choices`` where this machine measured them before
        (:mod:`.kernel_choices`: ~1.9 s of a warm start on the AVX2 EPYC).

        Why measured: on one AVX512-BF16 EPYC int8 weights beat plain bf16 GEMMs up to ~14 rows; on another,
        against packed bf16, only up to 3 (6 rows: int8 32-44 ms a step, packed 23 ms); FBGEMM's fp16 weights
        beat packed float32 up to 12 rows on the AVX2 EPYC at 2 threads, to 16 on 1.  The passes cover the
        whole model so they read the weights from memory, as decode does (one matrix timed alone sits in the
        cache, and there int8 looked faster up to 4 rows).  ~0.4 s at load."""
        mats = self._decode_weights()
        packed = {}
        for w in mats:
            if id(w) not in packed:
                p = pack_for_decode(w)
                if p is None:
                    return
                packed[id(w)] = p

        def inputs(rows: int) -> dict[int, torch.Tensor]:
            return {n: torch.randn(rows, n, dtype=self.dtype) for n in {w.shape[1] for w in mats}}

        plain = onednn_linear if self.onednn_max_rows else F.linear

        def plain_pass(xs: dict[int, torch.Tensor]) -> None:
            for w in mats:
                plain(xs[w.shape[1]], w)

        def packed_pass(xs: dict[int, torch.Tensor]) -> None:
            for w in mats:
                packed_linear(xs[w.shape[1]], packed[id(w)])

        def small_pass(xs: dict[int, torch.Tensor]) -> None:
            for w in mats:
                self._small_linear(xs[w.shape[1]], self.small[id(w)])

        def packed_wins() -> bool:
            six = inputs(6)
            best = best_times({"packed": lambda: packed_pass(six), "plain": lambda: plain_pass(six)}, 2)
            return best["packed"] < best["plain"]

        def small_wins(rows: int) -> bool:
            xs = inputs(rows)
            best = best_times({"small": lambda: small_pass(xs), "packed": lambda: packed_pass(xs)}, 2)
            return best["small"] < best["packed"]

        def crossover() -> int:
            # Most rows among 1, 2, 4, 8, 12, 16 up to which the small-batch weights win (taken as one crossover),
            # found from the middle: 3 measurements instead of up to 5 (~0.3 s each at load).
            counts = (1, 2, 4, 8, 12, 16)
            lo, hi = 0, len(counts)  # counts[:lo] win; counts[hi:] lose
            while lo < hi:
                mid = (lo + hi) // 2
                if small_wins(counts[mid]):
                    lo = mid + 1
                else:
                    hi = mid
            return counts[lo - 1] if lo else 0

        with torch.inference_mode():
            if not choices.get("packed", packed_wins):
                return
            self.packed = packed
            if self.small:
                self.small_max_rows = choices.get("small_max_rows", crossover)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 LM-head logits of final-norm ``hidden`` states [T, H] through this machine's float32 kernel choice
        (packed oneDNN weights up to :attr:`packed_max_rows` rows, no small-batch copies): teacher-forced scoring's
        product, many positions at once."""
        return self._linear(hidden, self.lm_head, small=False).float()

    def _small_linear(self, x: torch.Tensor, entry: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear`` through a small-batch copy (:attr:`small`) of a weight."""
        if self.small_kind == "int8":
            return int8_linear(x, *entry, bias)
        return fp16_linear(x, entry, bias)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, small: bool, bias: torch.Tensor | None = None,
                exact: bool = False) -> torch.Tensor:
        """``exact``: a row's result must not depend on how many rows come with it (:func:`row_exact_linear`)."""
        if exact:  # (the packed copy, if any, on every call: a runner's choice of it does not change after load)
            return row_exact_linear(x, w, bias, self.packed.get(id(w)))
        if small and self.small:
            return self._small_linear(x, self.small[id(w)], bias)
        rows = x.numel() // x.shape[-1]
        if rows <= self.packed_max_rows and self.packed:
            return packed_linear(x, self.packed[id(w)], bias)
        if rows <= self.onednn_max_rows:
            return onednn_linear(x, w, bias)
        return F.linear(x, w, bias)

    # ------------------------------------------------------------------ cache API
    def new_cache(self, slots: int = 1, capacity: int = 256, budget: int | None = None) -> KVCache:
        return KVCache(self.dims, self.kv_dtype, self.device, slots, capacity, budget)

    # ------------------------------------------------------------------ forward
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Statistics in float32, as HF computes them; one fused op (bit-identical to the pow/mean/rsqrt
        # chain it replaced, three fewer dispatches: a decode step runs 61 of these on tensors of a few KB).
        return F.rms_norm(x.float(), (x.shape[-1],), w, self.dims.rms_eps).to(self.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of ``x`` [..., D]: ``x*cos + rotate_half(x)*sin``, rotate_half(x) = (-x2, x1).

        Why this form: the sign lives in the table (``signed_sin``) and the halves swap with one ``roll``, so a
        call is 4 ops instead of 7 -- bit-identical, since negation is exact -- and it runs once over q and k
        together (3x faster per layer on a decode step, where these ops cost their dispatch, not their math)."""
        return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * signed_sin

    @staticmethod
    def _mask(pos: torch.Tensor, start: list[int], total: int, groups: int, window: int | None,
              dtype: torch.dtype) -> torch.Tensor | None:
        """Additive attention mask [B, 1, groups*T, total] in ``dtype``, 0 or -inf (None when every query sees
        every key).

        Key j is visible to query t of row b iff j <= start[b] + t (causal + the row's own
        length) and, on sliding-window layers, j > start[b] + t - window.  Additive, not boolean: SDPA turns a
        boolean mask into this (logical_not + where) on every call, i.e. in every layer -- the same values, so
        the same bits, built once per forward instead.
        """
        B, T = pos.shape
        if T == 1 and all(s + 1 == total for s in start) and (window is None or total <= window):
            return None  # let SDPA take its unmasked fast path
        key_pos = torch.arange(total, device=pos.device)
        mask = key_pos[None, None, :] <= pos[:, :, None]  # [B, T, L]
        if window is not None:
            mask &= key_pos[None, None, :] > pos[:, :, None] - window
        # GQA without copying K/V: the query heads sharing one KV head are folded into the
        # query-length axis, so attention runs on [B, kv_heads, groups*T, D].
        mask = mask[:, None, None].expand(B, 1, groups, T, total).reshape(B, 1, groups * T, total)
        return torch.zeros(mask.shape, dtype=dtype, device=pos.device).masked_fill_(~mask, float("-inf"))

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        first_slot: int,
        start: list[int],
        logits: str = "last",
        small_weights: bool = True,
        kv_grid: int = 0,
        shared: list[tuple[int, int, int]] | None = None,
    ) -> ForwardOutput:
        """Run ``tokens`` [B, T] for cache slots ``first_slot .. first_slot+B-1``.

        Row ``b`` writes its K/V at positions ``start[b] .. start[b]+T-1`` and attends to
        positions ``< start[b]+t+1``; afterwards ``cache.lengths`` of the row is
        ``start[b]+T``.  ``logits``: ``"last"`` (next-token logits only), ``"all"``
        (every position, for speculative verification) or ``"none"`` (hidden states only: an empty ``logits``).  ``small_weights=False``: never the small-batch weights (the
        engine's prefill, so a prompt's K/V does not depend on how it was cut into chunks).
        ``kv_grid``: for one row, attend in query blocks of ``kv_grid`` positions aligned at 0, each over
        keys ``0 .. its block's end`` (see :meth:`_attend_on_grid`), and every linear through
        :func:`row_exact_linear` (neither small-batch weights nor oneDNN): the engine's prefill, with the prefix cache's block size.
        ``shared``: for a decode step (T = 1), groups ``(row, count, prefix)`` of consecutive rows whose slots hold
        the same K/V for positions ``0..prefix-1`` (the n samples of one prompt): see :meth:`_attend_shared`.
        """
        d = self.dims
        B, T = tokens.shape
        dev = self.device
        self.forward_calls += 1
        total = max(start) + T
        on_grid = bool(kv_grid) and B == 1
        # On the grid the last block's queries see keys up to the block's end (the later ones masked): the cache
        # holds that many, so the key count, and with it SDPA's order of sums, never depends on its capacity.
        cache.reserve(first_slot + B, -(-total // kv_grid) * kv_grid if on_grid else total)
        starts = torch.tensor(start, device=dev, dtype=torch.long)
        pos = starts[:, None] + torch.arange(T, device=dev)  # [B, T]
        ropes = {theta: (c[pos].unsqueeze(2), s_[pos].unsqueeze(2)) for theta, (c, s_) in self.rope.items()}  # [B, T, 1, D]
        same_start = len(set(start)) == 1
        rows = torch.arange(first_slot, first_slot + B, device=dev)[:, None].expand(B, T)
        groups = d.heads // d.kv_heads
        masks: dict = {} if on_grid else {w: self._mask(pos, start, total, groups, w, self.kv_dtype) for w in set(d.windows)}
        share = [g for g in shared or () if g[1] > 1] if T == 1 and self.shared_attention and not on_grid else []

        # Small-batch weights or not goes by sequences, not token rows: a speculative verification of one sequence (T = k+1 rows)
        # then multiplies by the same weights as that sequence's plain steps, so greedy output stays the same.
        # Longer runs of rows (scoring, a drafter's prompt) are slow there and take the other weights.
        small = small_weights and B <= self.small_max_rows and B * T <= SMALL_MAX_TOKENS
        exact = bool(kv_grid)  # the engine's prefill: every row's bits independent of the chunk (row_exact_linear)
        x = self.embed[tokens]  # [B, T, H]
        if d.embed_scale != 1.0:
            x = x * torch.tensor(d.embed_scale, dtype=self.dtype, device=dev)
        nq, nkv = d.heads * d.head_dim, d.kv_heads * d.head_dim
        for li, L in enumerate(self.layers):
            cos, sin = ropes[d.layer_rope_theta[li]]
            h = self._rms(x, L["attn_norm"])
            qkv = self._linear(h, L["qkv"], small, L.get("qkv_bias"), exact)
            qk = qkv[..., : nq + nkv].view(B, T, d.heads + d.kv_heads, d.head_dim)
            v = qkv[..., nq + nkv :].view(B, T, d.kv_heads, d.head_dim)
            if d.qk_norm:
                qk = torch.cat([self._rms(qk[:, :, : d.heads], L["q_norm"]), self._rms(qk[:, :, d.heads :], L["k_norm"])], 2)
            qk = self._rope(qk, cos, sin)  # [B, T, heads + KVH, D]
            q = qk[:, :, : d.heads].transpose(1, 2)  # [B, heads, T, D]
            k = qk[:, :, d.heads :]  # [B, T, KVH, D]
            kc, vc = cache.k[li], cache.v[li]  # [S, KVH, C, D]
            if same_start:  # every row at one length (the n samples of a prompt; a prefill): plain slices
                kc[first_slot : first_slot + B, :, start[0] : start[0] + T] = k.transpose(1, 2).to(self.kv_dtype)
                vc[first_slot : first_slot + B, :, start[0] : start[0] + T] = v.transpose(1, 2).to(self.kv_dtype)
            else:  # advanced indices (rows, pos) around a slice -> value shape [B, T, KVH, D]
                kc[rows, :, pos] = k.to(self.kv_dtype)
                vc[rows, :, pos] = v.to(self.kv_dtype)
            if on_grid:
                a = self._attend_on_grid(q, kc[first_slot : first_slot + 1], vc[first_slot : first_slot + 1],
                                         pos, start[0], kv_grid, d.windows[li], masks)
            elif share and d.windows[li] is None:
                qg = q.reshape(B, d.kv_heads, groups * T, d.head_dim).to(self.kv_dtype)
                a = self._attend_shared(qg, kc, vc, first_slot, total, masks[None], share)
            else:
                keys = kc[first_slot : first_slot + B, :, :total]
                vals = vc[first_slot : first_slot + B, :, :total]
                qg = q.reshape(B, d.kv_heads, groups * T, d.head_dim).to(self.kv_dtype)
                a = self._attend(qg, keys, vals, masks[d.windows[li]])
            a = a.reshape(B, d.heads, T, d.head_dim).transpose(1, 2).reshape(B, T, nq).to(self.dtype)
            a = self._linear(a, L["o"], small, exact=exact)
            if d.sandwich_norms:
                a = self._rms(a, L["post_attn_norm"])
            x = x + a
            h = self._rms(x, L["mlp_norm"])
            gu = self._linear(h, L["gate_up"], small, exact=exact)
            g, u = gu.chunk(2, dim=-1)
            act = F.silu(g) if d.activation == "silu" else F.gelu(g, approximate="tanh")
            m = self._linear(act * u, L["down"], small, exact=exact)
            if d.sandwich_norms:
                m = self._rms(m, L["post_mlp_norm"])
            x = x + m
        hidden = self._rms(x, self.final_norm)
        for b, s in enumerate(start):
            cache.lengths[first_slot + b] = s + T
        if logits == "none":  # the caller applies the head itself (teacher-forced scoring, engine/scoring.py)
            return ForwardOutput(logits=hidden.new_zeros(0), hidden=hidden)
        head_in = hidden[:, -1:] if logits == "last" else hidden
        out = self._linear(head_in, self.lm_head, small, exact=exact).float()
        return ForwardOutput(logits=out, hidden=hidden)

    def _attend(self, qg: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of ``qg`` [B, kv_heads, G, D]: a few queries per KV head (a decode step, a prompt's last block of
        one or a few tokens) by :func:`attend_by_products` where the cache is float32 (bits independent of the thread
        count), else SDPA."""
        if self.product_attention and qg.shape[2] <= PRODUCT_ATTENTION_MAX_QUERIES:
            return attend_by_products(qg, keys, vals, mask, self.scale)
        return F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask, scale=self.scale)

    def _attend_on_grid(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor, start: int,
                        grid: int, window: int | None, masks: dict) -> torch.Tensor:
        """Causal attention of one row's queries ``q`` [1, heads, T, D] in blocks of ``grid`` positions.

        Why: SDPA's sums run in an order that depends on how many (masked) keys it is given, so a query
        attending to ``0..start+T`` of a longer prompt gets other last bits than the same query in a
        shorter one.  Here the key range of a position is a function of its block alone (``0 .. block
        end``), so the K/V of a position depend only on the tokens up to its block's end -- not on the
        prompt's length, nor on how the prefill was chunked (the chunk size changes with load).  That
        makes a prefix-cache hit (whole blocks, :mod:`.prefix_cache`) bit-identical to computing it.
        Chunks must start on the grid (the engine's chunk sizes are whole blocks): a block cut by a chunk
        boundary would run with fewer queries, and SDPA rounds differently for a different query count.
        It also skips the fully masked key blocks of a long chunk.  ``masks``: the forward's, filled here with
        each block's mask on the first layer and read by the others.  Returns [1, heads, T, D].
        """
        d = self.dims
        T = q.shape[2]
        groups = d.heads // d.kv_heads
        qv = q.view(1, d.kv_heads, groups, T, d.head_dim)
        out = torch.empty(1, d.kv_heads, groups, T, d.head_dim, dtype=self.kv_dtype, device=q.device)
        t = 0
        while t < T:
            p = start + t
            end = min((p // grid + 1) * grid, kc.shape[2])  # this block's end: its keys are 0..end
            tb = min(end - p, T - t)
            qb = qv[:, :, :, t : t + tb].reshape(1, d.kv_heads, groups * tb, d.head_dim).to(self.kv_dtype)
            mask = masks.get((t, window), False)
            if mask is False:
                mask = masks[(t, window)] = self._mask(pos[:, t : t + tb], [p], end, groups, window, self.kv_dtype)
            a = self._attend(qb, kc[:, :, :end], vc[:, :, :end], mask)  # (a prompt's last few tokens: by products)
            out[:, :, :, t : t + tb] = a.view(1, d.kv_heads, groups, tb, d.head_dim)
            t += tb
        return out.view(1, d.heads, T, d.head_dim)

    def _attend_shared(self, qg: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, first: int, total: int,
                       mask: torch.Tensor | None, groups: list[tuple[int, int, int]]) -> torch.Tensor:
        """Decode attention of ``qg`` [B, kv_heads, G, D] where groups of rows share a prompt's K/V: the prompt's keys
        are read once per group, not once per row.

        Why: the n samples of a prompt each hold a copy of its K/V, and a decode step read every copy: 6 rows over
        a 7,000-token prompt took 155 ms a step against 41 ms for one row (SmolLM2, 2 cores), nearly all of it
        attention.  Here each group's queries attend to the first row's copy of the prompt in one call, each row to
        its own tail in another, and the two are merged by their log-sum-exp (exact softmax algebra, in float32:
        against a float32 reference it errs as much as the plain path, 2e-4).  One layer: 1.4 ms against 5.5 ms.
        Rows in no group take the plain path.  ``mask``: the forward's [B, 1, G, total] (None: all keys visible)."""
        B, H, G, D = qg.shape
        out = torch.empty_like(qg)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        rest = [True] * B
        for r, n, plen in groups:
            rows = slice(r, r + n)
            rest[rows] = [False] * n
            qs = qg[rows].transpose(0, 1).reshape(1, H, n * G, D)
            o1, l1 = flash(qs, kc[first + r : first + r + 1, :, :plen], vc[first + r : first + r + 1, :, :plen], scale=self.scale)[:2]
            tail_mask = None if mask is None else mask[rows, :, :, plen:total]
            tail_k, tail_v = kc[first + r : first + r + n, :, plen:total], vc[first + r : first + r + n, :, plen:total]
            if self.product_attention:  # each row's few queries over its own tail (see attend_by_products)
                o2, l2 = attend_by_products_lse(qg[rows], tail_k, tail_v, tail_mask, self.scale)
            else:
                o2, l2 = flash(qg[rows], tail_k, tail_v, attn_mask=tail_mask, scale=self.scale)[:2]
            o1 = o1.view(H, n, G, D).transpose(0, 1).float()
            l1 = l1.view(H, n, G).transpose(0, 1)
            top = torch.maximum(l1, l2)
            w1, w2 = (l1 - top).exp_(), (l2 - top).exp_()
            out[rows] = ((o1 * w1[..., None] + o2.float() * w2[..., None]) / (w1 + w2)[..., None]).to(qg.dtype)
        i = 0
        while i < B:  # the rows in no group, in runs of consecutive rows: the plain path
            if not rest[i]:
                i += 1
                continue
            j = i
            while j < B and rest[j]:
                j += 1
            out[i:j] = self._attend(qg[i:j], kc[first + i : first + j, :, :total], vc[first + i : first + j, :, :total],
                                    None if mask is None else mask[i:j])
            i = j
        return out

    def prefill(self, ids: list[int], cache: KVCache, slot: int, chunk: int = 512) -> ForwardOutput:
        """Run a prompt into ``slot`` (from position 0); returns next-token logits [1, 1, V] and the
        hidden states of every position [1, T, H].  See :meth:`prefill_steps`."""
        return run_steps(self.prefill_steps(ids, cache, slot, chunk))

    def prefill_steps(self, ids: list[int], cache: KVCache, slot: int, chunk: int = 512,
                      start: int = 0) -> Generator[None, None, ForwardOutput]:
        """:meth:`prefill` one chunk per ``next``, for a caller that does other work between chunks (the
        engine's speculative requests: the batched sequences keep decoding through a long prompt).

        The engine's prefill numerics (as ``Engine._prefill_chunk``): on the prefix cache's block grid and
        never the small-batch weights, so a prompt's K/V have the bits the batched path computes for it, whatever
        ``chunk`` is (rounded to whole blocks).  ``start``: the slot already holds that many tokens (a prefix-cache
        hit, whole blocks); the hidden states returned are of the positions computed here.  It is also faster than
        the causal-mask path speculative requests used to prefill with: 2.24-2.33 s against 2.55-3.07 s (one
        masked pass) for SmolLM2's 1,696-token Self-MoA aggregation prompt on the 2-core EPYC.
        """
        if not 0 <= start < len(ids) or start % PREFILL_GRID:
            raise ValueError(f"prefill of {len(ids)} tokens from {start}: empty, or not on the grid")
        chunk = max(PREFILL_GRID, chunk // PREFILL_GRID * PREFILL_GRID)
        hiddens = []
        for i in range(start, len(ids), chunk):
            if i > start:
                yield
            part = torch.tensor([ids[i : i + chunk]], device=self.device)
            out = self.forward(part, cache, slot, [i], logits="last", small_weights=False, kv_grid=PREFILL_GRID)
            hiddens.append(out.hidden)
        return ForwardOutput(logits=out.logits, hidden=torch.cat(hiddens, dim=1))

    def decode(self, tokens: list[int], cache: KVCache, first_slot: int = 0,
               shared: list[tuple[int, int, int]] | None = None) -> ForwardOutput:
        """One step for rows ``first_slot..first_slot+len(tokens)-1``, each at its own length (``shared``: see
        :meth:`forward`)."""
        start = [cache.lengths[first_slot + b] for b in range(len(tokens))]
        t = torch.tensor(tokens, device=self.device)[:, None]
        return self.forward(t, cache, first_slot, start, logits="last", shared=shared)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    s = torch.matmul(q * scale, k.transpose(-1, -2))
    return s if mask is None else s.add_(mask)


def attend_by_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """Attention of ``q`` [..., G, D] over ``k``, ``v`` [..., T, D] (``mask`` additive, broadcast to [..., G, T]) as
    two matrix products around a softmax, for a decode step's few queries per KV head.

    Why not SDPA there: torch's CPU flash kernel sums a handful of queries per head (SmolLM2's step: 3 per KV head;
    with one KV head, as gemma3-270m's, 1, 3, 5-7 or 9-11) in an order that depends on the thread count (float32, 1 against 2
    threads: results ~1e-7 apart), and the engine's thread tuner changes that count while requests decode (it
    probes the other setting now and then, even on a quiet machine), so a seeded request sampled other tokens from
    one run to the next (a walk: 4 of 5 repeats of one seeded n=3 request differed from the first). Here every
    score is one dot product and every row's sums stay in one thread: the same bits at 1 and 2 threads, and about
    as fast at these shapes (SmolLM2, 2 cores, one layer: 113 against 88 us for one row over 300 keys, 270 against
    362 us for 6 rows). Many queries per head (a prefill chunk, the n samples' queries over their shared prompt)
    keep the flash kernel: its sums there were the same at any thread count, and it is faster."""
    return torch.matmul(torch.softmax(_scores(q, k, mask, scale), -1), v)


def attend_by_products_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend_by_products` with each query's log-sum-exp of its scaled scores [..., G] (natural log, as the
    flash op's): for merging attention over two parts of the keys."""
    s = _scores(q, k, mask, scale)
    top = s.amax(-1, keepdim=True)
    e = s.sub_(top).exp_()
    total = e.sum(-1, keepdim=True)
    return torch.matmul(e, v).div_(total), (top + total.log()).squeeze(-1)


def _flash_with_lse_works() -> bool:
    """Whether this torch has the CPU flash-attention op that also returns the log-sum-exp, with a mask and a scale
    (:meth:`ModelRunner._attend_shared` merges two attentions by it; the public SDPA does not return it). A private
    op: checked once at load, and without it decoding takes the plain path."""
    try:
        q = torch.zeros(1, 1, 2, 8)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, attn_mask=torch.zeros(1, 1, 2, 2), scale=0.5)[:2]
        return out.shape == q.shape and lse.shape == (1, 1, 2)
    except (AttributeError, RuntimeError, TypeError):
        return False


def run_steps(steps: Generator[Any, Any, R]) -> R:
    """Drive a step generator (:meth:`ModelRunner.prefill_steps`) to its end, for a caller with nothing to
    interleave; returns its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def default_threads() -> int:
    """Intra-op threads: every core this process may use (2 here; more on a real box)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


# The share of the machine's memory (or the GPU's) an engine's slot KV cache may take unless its backend sets
# ``kv_cache_mb``: 6 GB on a 24 GB host. Why a quarter: while the cache grows its old copy lives beside the new one
# (half the memory at worst), the model, the prefix cache and a second engine (the default config's lazily loaded
# ``weak`` model) need the rest. SmolLM2's worst case (16 slots x its 8,192 positions: 3 GB in bf16, 6 GB in
# float32) fits; gemma3's in float32 (16 x 32,768 x 36 KB = 19 GB, and the old copy beside it while it grows) is past
# what a 24 GB host holds: an allocation past it is not refused on Linux, the kernel kills the server.
KV_BUDGET_SHARE = 0.25


def memory_bytes(device: torch.device) -> int:
    """Memory this process can have: the GPU's on CUDA; on the CPU the physical memory, or the cgroup's limit
    (a container's) when lower."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def kv_budget(kv_cache_mb: float | str | None, device: torch.device) -> int:
    """Bytes of the engine's slot KV cache: ``kv_cache_mb`` MB, or ``"auto"``/None: :data:`KV_BUDGET_SHARE` of
    :func:`memory_bytes`."""
    if kv_cache_mb is None or kv_cache_mb == "auto":
        return int(memory_bytes(device) * KV_BUDGET_SHARE)
    return int(float(kv_cache_mb) * 2**20)
