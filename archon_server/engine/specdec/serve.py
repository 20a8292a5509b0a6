"""Serving hook: speculative generation for one request on the engine's runner.

The ``LocalBackend`` calls :func:`speculative_generate_for_request` when a request's or a
backend's config carries::

    speculative: {method: specdec_pp|fixed|heuristic|confidence|entropy|cumprob,
                  draft: eagle (default, shipped) | ngram (prompt lookup) | <EAGLE folder> | <HF model folder>,
                  head: proposer | candidate (shipped heads, see AcceptHead.reads) | <folder>,
                  threshold: <float>, k: <int>, min_k: 2, max_k: 20}

and gets the tokens plus counters under vLLM's metric names.  Temperature 0 uses greedy
verification (greedy decoding of the same model; in bf16 a verification pass over k + 1 tokens
rounds differently from k + 1 one-token steps, so a near-tie can flip and a long answer then
differ from the batched path's: specdec README, "Greedy outputs"); otherwise standard speculative
sampling, which keeps the target's sampling distribution (temperature and top-p applied
to both sides).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import loading
from .draft import HEAD_READS, AcceptHead, EagleDraft
from .generate import EagleDrafter, LMDrafter, NgramDrafter, TargetModel, drive, speculative_rounds
from .policies import make_policy
from .sampling import SamplingConfig

_LOCK = threading.Lock()
_DRAFTS: dict[tuple[int, str], Any] = {}
_HEADS: dict[tuple[int, str], AcceptHead] = {}
# Which shipped head ``specdec_pp`` uses when the config names none: the proposer head needs no
# extra draft step per round and judges each candidate on time (greedy 1.12x vs 1.06x for the
# authors' head, engine/specdec/README.md); ``head: candidate`` selects the authors' form.
DEFAULT_HEAD_READS = "proposer"


@dataclass
class SpeculativeConfig:
    # Default: the head-free cumulative-probability rule.  No trained head predicts greedy acceptance
    # better than the distilled draft's own probability (held-out AUC 0.831 vs 0.828 proposer,
    # 0.846 vs 0.843 the authors'), so SpecDec++ makes the same decisions at the head's cost; it
    # lost to this rule in wall clock on every benchmark set (engine/specdec/README.md).
    # Fastest on a CPU for greedy requests: {method: fixed, k: 3, draft: ngram}.
    method: str = "cumprob"
    draft: str | None = None
    head: str | None = None
    threshold: float | None = None
    k: int | None = None
    min_k: int = 2
    max_k: int = 20

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpeculativeConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown speculative option(s): {sorted(unknown)}")
        return cls(**d)


def _draft_for(runner: Any, folder: str | None) -> Any:
    """``None``/``"eagle"``: the shipped EAGLE draft; a folder with ``draft.json``: another
    EAGLE draft; any other folder: a Hugging Face causal LM with the target's vocabulary
    (run as an :class:`LMDrafter`)."""
    key = (id(runner), folder or "")
    with _LOCK:
        if key not in _DRAFTS:
            if folder in (None, "", "eagle") or (Path(folder) / "draft.json").exists():
                _DRAFTS[key] = loading.load_draft(runner, None if folder in (None, "", "eagle") else folder)
            else:
                from transformers import AutoModelForCausalLM

                _DRAFTS[key] = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
        return _DRAFTS[key]


def _head_for(runner: Any, name: str | None, greedy: bool) -> AcceptHead:
    """``None``: the shipped head of :data:`DEFAULT_HEAD_READS`; ``proposer`` / ``candidate``: that
    shipped head; anything else: a head folder (ours or the authors' format)."""
    name = name or DEFAULT_HEAD_READS
    mode = "greedy" if greedy else "sampled"
    path = str(loading.head_dir(mode, name) if name in HEAD_READS else Path(name))
    key = (id(runner), path)
    with _LOCK:
        if key not in _HEADS:
            _HEADS[key] = loading.load_head(path, runner.device)[0]
        return _HEADS[key]


def speculative_generate_for_request(
    runner: Any,
    prompt_ids: list[int],
    spec: dict[str, Any] | SpeculativeConfig,
    *,
    on_tokens: Callable[[list[int]], bool] | None = None,
    **options: Any,
) -> tuple[list[int], dict[str, Any]]:
    """Generate for one sequence; ``options`` are :func:`speculative_session`'s (temperature,
    top_p, max_tokens, seed, stop_ids, cache, slot).

    Returns ``(tokens, metrics)``; metrics has ``mean_acceptance_length``,
    ``draft_acceptance_rate``, ``num_draft_tokens``, ``num_accepted_draft_tokens`` (vLLM's
    names) and ours (target_forward_passes, mean_k, ...).  Not thread-safe per runner:
    call it from the worker that owns the runner.  ``on_tokens``: see :func:`speculative_generate`.
    """
    return drive(speculative_session(runner, prompt_ids, spec, **options), on_tokens)


def speculative_session(
    runner: Any,
    prompt_ids: list[int],
    spec: dict[str, Any] | SpeculativeConfig,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 256,
    seed: int | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    cache: Any = None,
    slot: int = 0,
    prefill_chunk: int = 512,
    prefix: Any = None,
) -> Generator[list[int], "bool | None", tuple[list[int], dict[str, Any]]]:
    """One speculative generation, one round at a time (see :func:`~.generate.speculative_rounds`):
    the engine's worker advances several of these between its batched decode steps.  Generates
    in ``cache`` slot ``slot`` (a fresh one-slot cache if None); the prompt goes in ``prefill_chunk``-token
    rounds that commit nothing, after what ``prefix`` (the engine's prefix cache) holds of it when the drafter
    does not read the target's features of the prompt (n-gram, a separate LM).  A bad config raises at the
    first ``next``."""
    cfg = spec if isinstance(spec, SpeculativeConfig) else SpeculativeConfig.from_dict(spec)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p)
    policy = make_policy(cfg.method, cfg.threshold, cfg.k, cfg.min_k, cfg.max_k)
    mode = "greedy" if sampling.greedy else "sampled"
    drafter: Any
    if cfg.draft == "ngram":  # prompt lookup: point-mass drafts, no head
        if policy.needs_head:
            raise ValueError("specdec_pp needs a model draft (the n-gram drafter has no hidden states)")
        drafter = NgramDrafter(runner.dims.vocab)
        mode = "greedy" if sampling.greedy else "point_mass"
    else:
        draft = _draft_for(runner, cfg.draft)
        head = _head_for(runner, cfg.head, sampling.greedy) if policy.needs_head else None
        drafter = EagleDrafter(draft, head) if isinstance(draft, EagleDraft) else LMDrafter(draft, head)
    needs_features = isinstance(drafter, EagleDrafter)  # it reads the target's hidden state at every prompt position
    target = TargetModel(runner, slot=slot, cache=cache, prefill_chunk=prefill_chunk,
                         prefix=None if needs_features else prefix)
    tokens, stats = yield from speculative_rounds(prompt_ids, target, drafter, policy, mode, sampling,
                                                  max_tokens, seed, stop_ids)
    metrics: dict[str, Any] = stats.metrics()
    metrics["spec_method"] = policy.describe()
    return tokens, metrics
