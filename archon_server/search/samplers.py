"""Sampler and pruner factories: the config names a strategy, Optuna provides it.

Kept apart from the study runner so a strategy is swapped in the YAML (or by
passing a ready-made Optuna object) without touching the search loop.
"""

from __future__ import annotations

import hashlib
import warnings

import optuna

from archon_server.search.config import PrunerConfig, SamplerConfig


def sampler_seed(seed: int | None, seed_offset: int = 0, n_trials: int = 0) -> int | None:
    """The seed of a worker's sampler: the config's ``seed`` plus ``seed_offset`` (each worker of a shared study its
    own stream) on a new study; on one that already holds ``n_trials`` trials, one derived from all three.

    Optuna stores the trials, not the sampler's random state: a sampler seeded as on the first run restarts its
    stream on resume and proposes the first run's graphs again (duplicates: free, but each takes a trial of the
    budget and tells nothing new).  A seed derived from the history moves on instead, and stays deterministic: the
    same seed, worker and history give the same proposals.  None stays None (unseeded)."""
    if seed is None:
        return None
    if n_trials == 0:
        return seed + seed_offset  # a new study proposes what it always did
    digest = hashlib.sha256(f"archon-search-resume:{seed}:{seed_offset}:{n_trials}".encode()).digest()
    return int.from_bytes(digest[:4], "big")  # numpy's RandomState takes seeds below 2**32


def make_sampler(
    cfg: SamplerConfig, *, multi_objective: bool = False, seed_offset: int = 0, n_trials: int = 0
) -> optuna.samplers.BaseSampler:
    """``seed_offset`` gives each worker of a shared study its own random stream (same seed = same proposals);
    ``n_trials``: trials the study already holds, so a resumed search continues instead of repeating (:func:`sampler_seed`)."""
    seed = sampler_seed(cfg.seed, seed_offset, n_trials)
    if cfg.type == "tpe":
        # multivariate+group model the conditional (define-by-run) space jointly;
        # constant_liar keeps concurrent workers from proposing the same point.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=cfg.n_startup_trials, multivariate=True, group=True, constant_liar=True
            )
    if cfg.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.type == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=cfg.population_size)
    if cfg.type == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    if cfg.type == "bruteforce":
        return optuna.samplers.BruteForceSampler(seed=seed)
    raise ValueError(f"unknown sampler {cfg.type!r}")  # pragma: no cover - pydantic restricts the literal


def make_pruner(cfg: PrunerConfig) -> optuna.pruners.BasePruner:
    """Steps are *numbers of dev questions evaluated*, so rungs are comparable across stage configs."""
    if cfg.type == "none":
        return optuna.pruners.NopPruner()
    if cfg.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
    if cfg.type == "percentile":
        return optuna.pruners.PercentilePruner(
            cfg.percentile, n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
        )
    if cfg.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=cfg.reduction_factor)
    if cfg.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=cfg.reduction_factor)
    raise ValueError(f"unknown pruner {cfg.type!r}")  # pragma: no cover
