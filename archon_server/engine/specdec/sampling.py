"""Turning logits into the distributions that drafting and verification compare.

Losslessness of speculative sampling holds for whatever distribution ``p`` the target
would have sampled from, so temperature and top-p must be applied identically to the
target's and the draft's logits before any ratio ``p/q`` is taken (vLLM and HF do the
same).  Temperature 0 means greedy: the "distribution" is a point mass on the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from archon_server.engine.sampling import draw


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def probs_from_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Softmax with temperature and nucleus (top-p) truncation over the last axis, float32.

    Greedy (temperature 0) returns a one-hot on the argmax, so a single code path can
    verify both greedy and sampled decoding.
    """
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        probs = top_p_filter(probs, sampling.top_p)
    return probs


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``; renormalise."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    # a token stays if the mass *before* it is < top_p (so the top token always stays)
    keep_sorted = (cum - sorted_p) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    out = probs * keep
    return out / out.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from a 1-D distribution (the engine's inverse-CDF :func:`~archon_server.engine.sampling.draw`;
    a one-hot row gives its token)."""
    return draw(probs, generator)


def entropy(probs: torch.Tensor) -> float:
    p = probs[probs > 0]
    return float(-(p * p.log()).sum())
