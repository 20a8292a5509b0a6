"""The real evaluator: run an architecture with the graph runtime over a bench dataset and grade it.

A thin adapter over :mod:`archon_server.bench.sweep` -- the same item runner, graders,
judges and call cache as ``archon bench`` -- so a search trial's score means exactly what
a sweep's score means.  The cache scope is the *architecture key*, not the trial's name:
the same graph asked the same question again (a later stage, a duplicate trial, a retried
trial, another worker sharing the cache file) costs no backend call.

Dev/test come from ``bench.datasets.select`` (its seeded 20/80 split) and are then
shuffled with the same seed, so "the first 5 dev questions" of a cheap stage are a random
sample rather than the first subject of MMLU.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from archon_server.search.config import SearchConfig
from archon_server.search.evaluator import EvalResult, StepCallback
from archon_server.search.space import architecture_key
from archon_server.spec import ArchitectureSpec, SpecError
from archon_server.exceptions import ArchonError


class EvaluationError(ArchonError, RuntimeError):
    """An evaluation produced no usable result."""


class BenchEvaluator:
    """Evaluator protocol on bench + graph runtime. ``registry`` holds the pool's backend aliases."""

    def __init__(
        self,
        dataset: str,
        registry: Any,
        *,
        cache_path: str | Path | None,
        judge: str | None = None,
        concurrency: int = 4,
        seed: int = 0,
        data_root: str | None = None,
        own_registry: bool = False,
    ):
        from archon_server.bench import datasets as ds
        from archon_server.bench.cache import CacheStore
        from archon_server.bench.sweep import BenchmarkEntry, SweepRun, SweepSpec, wrap_registry
        from archon_server.graph.runtime import GraphRuntime

        self.dataset = dataset
        self.registry = registry
        self.concurrency = concurrency
        self._own_registry = own_registry
        self._started = not own_registry
        self._start_lock = asyncio.Lock()
        sweep = SweepSpec(name=f"search-{dataset}", judge=judge, concurrency=concurrency, seed=seed,
                          architectures=["search"], benchmarks=[BenchmarkEntry(name=dataset)])
        self.store = CacheStore(cache_path) if cache_path else None
        wrap_registry(registry, sweep, self.store)
        out_dir = Path(cache_path).parent if cache_path else Path(".")
        self.run = SweepRun(sweep, out_dir, registry, GraphRuntime(registry), progress=False, data_root=data_root)
        self.items = {s: ds.shuffled(ds.select(dataset, split_name=s, seed=seed, root=data_root), seed) for s in ("dev", "test")}
        self.errors = 0  # questions whose generation or grading failed (scored 0)

    def split_size(self, split: str) -> int:
        return len(self.items[split])

    async def _ensure_started(self) -> None:
        async with self._start_lock:
            if not self._started:
                await self.registry.start()
                self._started = True

    async def evaluate(self, spec: ArchitectureSpec, split: str, limit: int | None = None,
                       on_step: StepCallback | None = None) -> EvalResult:
        await self._ensure_started()
        items = self.items[split][: limit or None]
        key = f"arch-{architecture_key(spec)}"
        sem = asyncio.Semaphore(self.concurrency)
        done = 0

        async def one(item: Any) -> dict[str, Any]:
            nonlocal done
            async with sem:
                rec = await self.run.run_item(key, spec, item)
            done += 1
            if on_step:
                on_step(done, len(items))
            return rec

        recs = await asyncio.gather(*(one(it) for it in items))
        failed = [r for r in recs if r.get("error")]
        if recs and len(failed) == len(recs):
            # Every question failed: a broken backend/binding, not a bad architecture. Fail the trial
            # (the reason lands in the study) instead of scoring 0 and steering the sampler away.
            raise EvaluationError(f"all {len(recs)} questions failed; first: {failed[0]['error']}")
        self.errors += len(failed)
        scores = [float(r.get("score") or 0.0) for r in recs]
        return EvalResult(
            score=sum(scores) / len(scores) if scores else 0.0,
            n=len(recs),
            calls=sum(int(r.get("calls") or 0) for r in recs),
            tokens=sum(int(r.get("prompt_tokens") or 0) + int(r.get("completion_tokens") or 0) for r in recs),
            per_question=scores,
            ids=[r["id"] for r in recs],
        )

    async def aclose(self) -> None:
        if self._own_registry and self._started:
            await self.registry.close()
        if self.store is not None:
            self.store.close()
            self.store = None


def _pool(config: SearchConfig) -> tuple[Path | None, Any]:
    """Check what ``evaluator: bench`` needs from the config (dataset, backends file, aliases) before anything is built
    or created; a problem is a :class:`SpecError` naming the config file and the field. (resolved backends path,
    its server config)."""
    from archon_server.bench.datasets import LOADERS
    from archon_server.config import load_config

    ev = config.evaluation
    errors: list[str] = []
    if not ev.dataset:
        errors.append("evaluation.dataset: required with evaluator: bench")
    elif ev.dataset not in LOADERS:
        errors.append(f"evaluation.dataset: unknown dataset {ev.dataset!r}; known: {', '.join(sorted(LOADERS))}")
    path = config.resolve_path(ev.backends) if ev.backends else None
    if path is not None and not path.is_file():
        where = f" (nor {path})" if str(path) != ev.backends else ""
        errors.append(f"evaluation.backends: no file {ev.backends!r}{where}; a relative path is read from the working "
                      "directory, else from the search config's folder")
    if errors:
        raise SpecError(errors, config.source)
    server = load_config(path)  # an invalid backends file names itself and its own fields
    aliases = {a for b in server.backends for a in (b.alias, *b.aliases)}
    pool = f"not a backend alias of {path or 'the embedded default config'} (aliases: {', '.join(sorted(aliases))})"
    errors = [f"models[{i}].name: {m.name!r} is {pool}" for i, m in enumerate(config.models) if m.name not in aliases]
    if ev.judge and ev.judge not in aliases:
        errors.append(f"evaluation.judge: {ev.judge!r} is {pool}")
    if config.space.scorer_weak and config.space.scorer_weak not in aliases:
        errors.append(f"space.scorer_weak: {config.space.scorer_weak!r} is {pool}")
    if errors:
        raise SpecError(errors, config.source)
    return path, server


def check_bench_config(config: SearchConfig) -> Path | None:
    """Validate the bench evaluation settings (see :func:`_pool`); the backends file it will read (None: the default)."""
    return _pool(config)[0]


def make_bench_evaluator(config: SearchConfig) -> BenchEvaluator:
    """From a search config: ``evaluation.backends`` is a server config file (None = the embedded default)."""
    from archon_server.backends.registry import build_registry

    _, server = _pool(config)
    ev = config.evaluation
    assert ev.dataset is not None  # checked by _pool
    registry = build_registry(server)
    cache = Path(config.export.report_dir) / config.study.name / "cache.sqlite"
    return BenchEvaluator(ev.dataset, registry, cache_path=cache, judge=ev.judge, concurrency=ev.concurrency,
                          seed=ev.seed, own_registry=True)
