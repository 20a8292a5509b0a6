"""Token sampling and logprobs: pure functions over a batch of logits.

Each row has its own settings and its own ``torch.Generator`` so a seeded request
draws the same tokens whichever other requests share its batch (the logits
themselves may still differ in the last bits with the batch's shape, as in vLLM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

_GREEDY_T = 1e-5  # temperatures below this mean argmax


@dataclass
class RowSampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    generator: torch.Generator | None = None
    min_p: float = 0.0  # vLLM: tokens below min_p x the most likely token's probability are dropped
    # vLLM-compatible penalties (``extra`` params); small models repeat themselves a lot.
    repetition_penalty: float = 1.0  # HF/vLLM: tokens seen in prompt or output get logit /p (>0) or *p (<0)
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this per occurrence in the output
    prompt_ids: list[int] | None = None  # for repetition_penalty
    output_ids: list[int] | None = None  # the row's generated tokens so far (shared list, appended by the engine)
    constraint: Any = None  # a grammar (engine/constrain.py): mask(logits) before the draw, accept(token) after
    # vLLM's min_tokens: these tokens (the model's EOS) are not drawn while ``output_ids`` is shorter than min_tokens.
    min_tokens: int = 0
    held_ids: torch.Tensor | None = None
    # logit_bias as (token ids [K], biases [K]) on the logits' device: added to the row's logits before anything else.
    bias: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def holding(self) -> bool:
        """EOS is held back for this draw (min_tokens not reached yet)."""
        return self.held_ids is not None and len(self.output_ids or ()) < self.min_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_T or self.top_k == 1


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def choice_seed(seed: int, index: int) -> int:
    """Seed of choice ``index`` of an n-sample request: distinct per choice, stable per request."""
    return (seed * 1_000_003 + index * 7919 + 0x9E3779B9) & 0x7FFF_FFFF_FFFF_FFFF


def filter_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int | None, min_p: float = 0.0) -> torch.Tensor:
    """Temperature-scaled logits of one row [V] with tokens outside min-p / top-k / top-p set to -inf."""
    x = logits / max(temperature, _GREEDY_T)
    if min_p > 0.0:  # p < min_p * p_max  <=>  logit < max logit + log(min_p): no softmax needed (after temperature, as vLLM)
        x = x.masked_fill(x < x.max() + math.log(min_p), float("-inf"))
    if top_k is not None and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token).
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def apply_penalties(logits: torch.Tensor, r: RowSampling) -> torch.Tensor:
    """Penalized copy of one row's logits [V] (same semantics as vLLM's sampler)."""
    x = logits.clone()
    out_ids = r.output_ids or []
    if r.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(out_ids) | set(r.prompt_ids or [])), dtype=torch.long, device=x.device)
        if seen.numel():
            v = x[seen]
            x[seen] = torch.where(v > 0, v / r.repetition_penalty, v * r.repetition_penalty)
    if out_ids and (r.presence_penalty or r.frequency_penalty):
        ids = torch.tensor(out_ids, dtype=torch.long, device=x.device)
        counts = torch.zeros_like(x).scatter_add_(0, ids, torch.ones_like(ids, dtype=x.dtype))
        x -= r.frequency_penalty * counts + r.presence_penalty * (counts > 0).to(x.dtype)
    return x


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One draw from a 1-D distribution ``probs`` [V] (weights need not sum to 1) by inverse CDF:
    a float64 running sum and a binary search for a uniform draw.  Exact up to float64 rounding;
    never picks a zero-weight token (``right=True`` finds the first sum above the draw).  Why not
    ``torch.multinomial``: over SmolLM2's 49k vocabulary on this CPU it costs 0.8 ms a draw,
    this 0.05 ms - a sampled decode step paid it once per row, a speculative round once per
    candidate and once more to verify.  ``generator`` must live on ``probs``' device."""
    c = probs.double().cumsum(-1)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=c.device) * c[-1]
    return min(int(torch.searchsorted(c, u, right=True)[0]), probs.shape[-1] - 1)


def sample_rows(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    """One token per row of ``logits`` [B, V] (float32)."""
    out: list[int] = []
    greedy_ids = None
    for b, r in enumerate(rows):
        if r.penalized or r.constraint is not None or r.holding or r.bias is not None:
            row = logits[b] if r.bias is None else logits[b].index_add(0, r.bias[0], r.bias[1])  # a copy: logprobs read the raw row
            row = apply_penalties(row, r) if r.penalized else row
            if r.constraint is not None:
                row = r.constraint.mask(row)
            if r.holding:
                held = row.index_fill(0, r.held_ids, float("-inf"))
                # A grammar that allows nothing but the end now (a complete JSON answer) wins over min_tokens.
                if r.constraint is None or bool(torch.isfinite(held).any()):
                    row = held
            tok = int(row.argmax()) if r.greedy else draw(filter_logits(row, r.temperature, r.top_p, r.top_k, r.min_p).softmax(-1), r.generator)
            if r.constraint is not None:
                r.constraint.accept(tok)
            out.append(tok)
            continue
        if r.greedy:
            if greedy_ids is None:
                greedy_ids = logits.argmax(-1).tolist()
            out.append(int(greedy_ids[b]))
            continue
        out.append(draw(filter_logits(logits[b], r.temperature, r.top_p, r.top_k, r.min_p).softmax(-1), r.generator))
    return out


def token_logprobs(logits: torch.Tensor, chosen: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of ``chosen`` under the model's distribution of one row [V], and the ``top`` best.

    Reported from the raw logits (before temperature/top-p), as OpenAI and vLLM do.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    alts: list[tuple[int, float]] = []
    if top > 0:
        vals, ids = torch.topk(lp, top)
        alts = list(zip(ids.tolist(), vals.tolist()))
    return float(lp[chosen]), alts
