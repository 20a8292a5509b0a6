"""Sweeps: architectures × benchmarks × subsets, run concurrently, cached, resumable.

A sweep file (``benchmarks/<name>.yaml``)::

    name: smoke
    judge: judge                 # backend alias of the judge (judged benchmarks only)
    concurrency: 8               # questions in flight at once
    backend_concurrency: {default: 4}   # calls in flight per backend alias (sweep-level cap)
    seed: 0
    params: {max_tokens: 512}    # optional sampling for the architecture's final stage
    architectures: [moa-lite, self-moa, null-model]   # catalog names, files, backend aliases; `null-model` = constant output
    benchmarks:
      - {name: math500, split: dev, n: 5}
      - {name: alpaca_eval, n: 5}
      - {name: humaneval, n: 20, pass_at: {n: 10, k: [1, 10]}}   # 10 samples per problem, pass@1/pass@10

Every finished (architecture, benchmark, question) is appended as one JSON line to
``<out>/results.jsonl`` (flushed and fsynced), so a killed run resumes where it stopped:
keys already present are skipped and never duplicated.  Every backend call goes through
:class:`CachingBackend` (``<out>/cache.sqlite``), so even the question that was in flight
when the run died costs nothing the second time.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_serializer, field_validator, model_validator

from ..backends.base import Backend, Usage, numeric_stats
from ..components import FinalOverrides
from ..graph.runtime import GraphError
from ..sampling_fields import MaxTokens, N, Seed, Stop, Temperature, TopK, TopLogprobs, TopP, check_top_logprobs
from ..spec import ArchitectureSpec, SpecError, validation_messages
from . import datasets as ds
from .cache import CacheStore, CachingBackend, cache_scope
from .definition import VERSION_KEY, params_unchanged, stamped, version_problem
from .grading import AUTO_GRADED, grade, grade_mmlu_logprob, pass_at_k
from .judges import NULL_OUTPUT, AlpacaJudge, ArenaHardJudge, MTBenchJudge
from .progress import Reporter

JUDGED = ("alpaca_eval", "mt_bench", "arena_hard")
NULL_ARCH = "null-model"
# Why an architecture's pair with an MMLU `mode: logprob` benchmark is skipped (its records carry it as `skipped`).
LOGPROB_SKIP = "mode logprob scores one model's letters; this architecture is not a single generator of one model"


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


DEFAULT_PASS_K = (1, 10, 100)


class PassAt(_Base):
    """pass@k (Codex paper): ``n`` samples per problem, the unbiased estimate for each ``k`` <= n.

    ``k`` left out: those of 1, 10, 100 that are <= n.  A ``k`` given beyond ``n`` is refused (its estimate
    does not exist), not dropped."""

    n: int = Field(ge=1, le=1000)
    k: list[int] = Field(default_factory=list, description="Default: those of 1, 10, 100 that are <= n.")

    @model_validator(mode="after")
    def _k_within_n(self) -> PassAt:
        if not self.k:
            self.k = [k for k in DEFAULT_PASS_K if k <= self.n]
        bad = [k for k in self.k if not 1 <= k <= self.n]
        if bad:
            raise ValueError(f"pass_at.k must lie in 1..n={self.n} (pass@k needs k <= n samples); got {bad}")
        return self


class BenchmarkEntry(_Base):
    name: str
    split: str | None = Field(default=None, pattern="^(dev|test)$")
    n: int | None = Field(default=None, ge=1)
    ids: list[str] | None = None
    seed: int | None = None
    pass_at: PassAt | None = Field(default=None, description="Auto-graded benchmarks: n samples per problem, pass@k.")
    mode: Literal["generate", "logprob"] = Field(
        default="generate", description="MMLU only: `logprob` scores the four letters (lm-evaluation-harness), reported as <name>_logprob.")

    @model_validator(mode="after")
    def _known(self) -> BenchmarkEntry:
        if self.name not in ds.LOADERS:
            raise ValueError(f"unknown benchmark {self.name!r}; known: {', '.join(sorted(ds.LOADERS))}")
        if self.mode == "logprob" and not self.name.startswith("mmlu"):
            raise ValueError(f"mode logprob is for MMLU, not {self.name!r}")
        if self.pass_at is not None and self.name in JUDGED:
            raise ValueError(f"pass_at needs an automatically graded benchmark, not {self.name!r}")
        return self


class SweepParams(_Base):
    """A sweep's ``params``: what its architectures' final stage gets, as a client's request parameters (README: *How
    request parameters apply*).  Only the fields a sweep sets reach the run (:meth:`final`); the rest stay the
    architecture's own.  Out-of-range values are refused when the sweep is loaded, naming ``params.<field>``.

    The fields' constraints are the API's (``archon_server.sampling_fields``, which the chat, completions and
    responses requests use too): what a client may send, a sweep may set, refused with the same words; ``stop`` is a
    string or a list of at most 4 strings; ``top_k`` 0 or -1 is off (vLLM's), as in a request."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    max_tokens: MaxTokens | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    n: N | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    extra: dict[str, Any] | None = Field(default=None, description="Passed to the final stage's backend calls as they are.")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        return check_top_logprobs(v, info.data.get("logprobs"))  # as a chat request (logprobs is declared before)

    def final(self, sample: int = 0) -> FinalOverrides:
        """The final stage's overrides: the fields this sweep sets, nothing filled in (``sample``: pass@k's sample
        number, added to a set ``seed`` so the samples differ)."""
        set_ = self.model_dump(exclude_none=True)
        extra = dict(set_.pop("extra", {}))
        if "top_k" in set_ and (top_k := set_.pop("top_k")) > 0:  # 0, -1: off, as a request's
            extra["top_k"] = top_k
        if "seed" in set_ and sample:
            set_["seed"] += sample
        return FinalOverrides(**set_, extra=extra)


class SweepSpec(_Base):
    name: str = "sweep"
    description: str = ""
    config: str | None = Field(default=None, description="Server config file (backends); the CLI's --config wins.")
    judge: str | None = Field(default=None, description="Backend alias of the judge for judged benchmarks.")
    judge_max_tokens: int | None = Field(
        default=None, ge=1, description="Cap on a generating judge's tokens (MT-Bench, Arena-Hard); default the reference "
        "harnesses' 2048 / 4096.  A verdict not given within the cap counts as unparsed, as a rating FastChat cannot parse.")
    concurrency: int = Field(default=8, ge=1, description="Questions in flight at once.")
    backend_concurrency: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="Calls in flight per backend alias (its backend's cap, shared by all its aliases); "
        "key `default` for the backends no key names.")
    seed: int = 0
    params: SweepParams | None = Field(default=None, description="Request parameters for the final stage (only those set apply).")
    architectures: list[str] = Field(min_length=1)
    benchmarks: list[BenchmarkEntry] = Field(min_length=1)
    null_text: str = NULL_OUTPUT
    keep_traces: bool = Field(default=False, description="Store each answer's trace in its result (`trace`, or `traces` per turn, "
                              "or per pass@k sample); the web console opens them.")
    _source: str | None = PrivateAttr(default=None)  # the sweep file, for error messages (not part of the definition)

    @field_serializer("params")
    def _params_as_set(self, v: SweepParams | None) -> dict[str, Any] | None:
        """Stored (``sweep.json``, a store) as written: the fields set, no defaults."""
        return None if v is None else v.model_dump(mode="json", exclude_none=True)

    @property
    def source(self) -> str:
        """Where the sweep came from, as errors name it: its file, else ``sweep <name>``."""
        return self._source or f"sweep {self.name}"


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; every failure is a :class:`SpecError` naming the file (and field or line)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"cannot read the sweep file: {e.strerror or e}"], str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise SpecError([f"{where}invalid YAML: {getattr(e, 'problem', None) or e}"], str(p)) from None
    if not isinstance(data, dict):
        raise SpecError(["<root>: a sweep must be a mapping"], str(p))
    data.setdefault("name", p.stem)
    from pydantic import ValidationError

    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(validation_messages(e), str(p)) from None
    spec._source = str(p)
    return spec


# The fields that do not change what a question's result is: they may differ between a run and its resume
# (or between the workers of a shared store).  Everything else must match, or results would mix.
OPERATIONAL_FIELDS = frozenset({"description", "concurrency", "backend_concurrency", "keep_traces"})


class SweepMismatch(SpecError):
    """A sweep's results were made with a different definition (the CLI prints it, exit 2)."""


def _short(v: Any) -> str:
    t = json.dumps(v, ensure_ascii=False, sort_keys=True)
    return t if len(t) <= 120 else t[:117] + "..."


def sweep_definition(spec: SweepSpec) -> dict[str, Any]:
    """The sweep as ``sweep.json`` and a shared store keep it: its fields and the
    :data:`~archon_server.bench.definition.DEFINITION_VERSION` of this archon-server."""
    return stamped(spec.model_dump(mode="json"))


def _normalised(definition: dict[str, Any]) -> dict[str, Any]:
    """A stored definition with pass@k's default ``k`` filled in as :class:`PassAt` fills it, so a definition
    stored without ``k`` (or with an empty one) compares equal to the same sweep read today."""
    benches = definition.get("benchmarks")
    if not isinstance(benches, list):
        return definition
    out = []
    for b in benches:
        pa = b.get("pass_at") if isinstance(b, dict) else None
        if isinstance(pa, dict) and not pa.get("k") and isinstance(pa.get("n"), int):
            b = {**b, "pass_at": {**pa, "k": [k for k in DEFAULT_PASS_K if k <= pa["n"]]}}
        out.append(b)
    return {**definition, "benchmarks": out}


def sweep_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """What differs between two sweep definitions (:func:`sweep_definition`), one line per field, operational fields
    (:data:`OPERATIONAL_FIELDS`) and the definition version (refused apart: :func:`check_resume`) left out; empty when
    the results of one are the other's.  pass@k's ``k`` is compared as :class:`PassAt` reads it (default filled in)."""
    out: list[str] = []
    if not prefix:
        old, new = _normalised(old), _normalised(new)
    for k in sorted(set(old) | set(new)):
        if not prefix and (k in OPERATIONAL_FIELDS or k == VERSION_KEY):
            continue
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += sweep_changes(a, b, prefix=f"{name}.")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(isinstance(x, dict) for x in a + b):
            # benchmarks: the entries that changed, field by field (`benchmarks[0].n: 2 -> 1`), not the whole list
            for i, (x, y) in enumerate(zip(a, b)):
                out += sweep_changes(x, y, prefix=f"{name}[{i}].")
        elif isinstance(a, list) and isinstance(b, list) and all(isinstance(x, dict) and "name" in x for x in a + b):
            out.append(f"{name}: {_short([x['name'] for x in a])} -> {_short([x['name'] for x in b])}")  # entries added/dropped
        elif isinstance(a, list) and isinstance(b, list) and all(isinstance(x, str) for x in a + b):
            gone, added = [x for x in a if x not in b], [x for x in b if x not in a]
            parts = ([f"dropped {gone}"] if gone else []) + ([f"added {added}"] if added else [])
            out.append(f"{name}: {', '.join(parts) or f'order {a} -> {b}'}")
        else:
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def same_results(stored: dict[str, Any]) -> tuple[int, ...]:
    """The older definition versions whose results a stored sweep definition would reproduce today: version 2 where
    its ``params`` did not depend on what version 2 filled in (bench.definition.params_unchanged)."""
    return (2,) if params_unchanged(stored.get("params")) else ()


def check_resume(spec: SweepSpec, out: Path) -> None:
    """A folder that holds results of a sweep is resumed only with the same definition (``<out>/sweep.json``):
    otherwise old answers would be reported under new settings.  Raises :class:`SweepMismatch` naming the changes, or
    saying that an older archon-server made them (another definition version: splits and parameters differ)."""
    saved, results = out / "sweep.json", out / "results.jsonl"
    if not saved.exists() or not results.exists():
        return
    n = len(ResultsLog(results, create=False).records)
    if not n:
        return
    try:
        old = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return  # unreadable: nothing to compare with (the run rewrites it)
    if not isinstance(old, dict):
        return
    problem = version_problem(old, f"{out} holds {n} results ({saved})",
                              f"use a new --out, or delete {results} to start over", same_results(old))
    if problem is not None:
        raise SweepMismatch([problem], spec.source)
    changes = sweep_changes(old, sweep_definition(spec))
    if changes:
        raise SweepMismatch([f"{out} holds {n} results of a different definition of this sweep ({saved}); changed: "
                             + "; ".join(changes),
                             f"use another --out, or delete {results} to start over (the call cache is kept); "
                             "--limit counts as part of the definition"], spec.source)


def limit_problem(spec: SweepSpec, out: Path, limit: int | None, unlimited: list[int | None]) -> str | None:
    """One line for a resume refused only because of ``--limit`` (``limit``: the one given; ``unlimited``: each
    benchmark's ``n`` before it applied): the results in ``out`` were made with another --limit, named as what to pass;
    None when the folder resumes, or differs in more than the limit (:func:`check_resume` says what then)."""
    saved, results = out / "sweep.json", out / "results.jsonl"
    if not saved.exists() or not results.exists():
        return None
    try:
        old = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(old, dict) or version_problem(old, "", "", same_results(old)) is not None:
        return None  # check_resume refuses it for its version
    changes = sweep_changes(old, sweep_definition(spec))
    stored_ns = [b.get("n") if isinstance(b, dict) else None for b in old.get("benchmarks") or []]
    if not changes or not all(c.startswith("benchmarks[") and "].n: " in c for c in changes) or len(stored_ns) != len(unlimited):
        return None
    n = len(ResultsLog(results, create=False).records)
    fits = [lim for lim in (None, *sorted({x for x in stored_ns if x is not None}))
            if [x if lim is None else min(x or lim, lim) for x in unlimited] == stored_ns]
    given = f"--limit {limit}" if limit is not None else "no --limit"
    if not fits:
        return None
    made = f"--limit {fits[0]}" if fits[0] is not None else "no --limit"
    return (f"{given}: {out} holds {n} results made with {made} ({'; '.join(changes)}); resume with {made}, "
            f"or use another --out")


# --------------------------------------------------------------------------- results file


def result_key(arch: str, benchmark: str, qid: str) -> str:
    return f"{arch}\x1f{benchmark}\x1f{qid}"


class ResultsLog:
    """Append-only JSONL of finished questions; a torn last line (killed mid-write) is ignored.

    A question whose record carries an ``error`` (a backend outage, a deadline) is not done: a re-run
    tries it again and appends a new record, which then supersedes the failed one. A question that
    succeeded is never run twice.
    """

    def __init__(self, path: str | Path, *, create: bool = True):
        """``create=False``: only read (a missing folder is not made)."""
        self.path = Path(path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._latest: dict[str, dict[str, Any]] = {}
        self.done: set[str] = set()
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self._keep(rec)
        self._needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        self._lock = asyncio.Lock()

    @property
    def records(self) -> list[dict[str, Any]]:
        """One record per question: its success, else its latest failure."""
        return list(self._latest.values())

    def _keep(self, rec: dict[str, Any]) -> None:
        k = result_key(rec["arch"], rec["benchmark"], rec["id"])
        if k in self.done:
            return
        self._latest[k] = rec
        if not rec.get("error"):
            self.done.add(k)

    async def claim(self, arch: str, benchmark: str, item: str) -> bool:
        """One process owns this file, so every question is its own (a shared store's claim can say no)."""
        return True

    async def wait_for_others(self, on_wait: Callable[[int], None] | None = None) -> set[str]:
        """Keys to try again because the worker that held them died; never any here (``on_wait`` as the store's)."""
        return set()

    async def append(self, rec: dict[str, Any]) -> None:
        k = result_key(rec["arch"], rec["benchmark"], rec["id"])
        async with self._lock:
            if k in self.done:
                return
            line = json.dumps(rec, ensure_ascii=False)
            with open(self.path, "a", encoding="utf-8") as f:
                if self._needs_newline:
                    f.write("\n")
                    self._needs_newline = False
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._keep(rec)


# --------------------------------------------------------------------------- backends


@dataclass
class CostMeter:
    calls: int = 0
    usage: Usage = field(default_factory=Usage)
    judge_calls: int = 0
    judge_usage: Usage = field(default_factory=Usage)


# --------------------------------------------------------------------------- architectures


Generate = Callable[[list[dict[str, Any]]], Any]  # async (messages) -> (text, calls, usage)


def resolve_architectures(names: Iterable[str], registry: Any, config: Any | None, base_dir: Path | None = None,
                          source: str | None = None) -> dict[str, ArchitectureSpec | None]:
    """name → spec (None for the built-in constant-output ``null-model``): a file path, a catalog name, or a backend
    alias, resolved by the server's one catalog (graph.catalog.Catalog).  ``source``: the sweep file errors name."""
    from ..graph.catalog import Catalog, UnknownArchitecture, find_file, is_architecture_file, looked_in

    catalog = Catalog(config.architectures_dirs if config is not None else (), registry)
    out: dict[str, ArchitectureSpec | None] = {}
    given: dict[str, tuple[int, str]] = {}  # the name results are recorded under -> (its entry, as written)
    for i, n in enumerate(names):
        if n == NULL_ARCH:
            if n in given:
                raise SpecError([f"architectures[{i}]: {n!r} is listed twice (results are kept per architecture name)"], source)
            out[n] = None
            given[n] = (i, n)
            continue
        if is_architecture_file(n) and catalog.lookup(n) is None and find_file(n, base_dir) is None:
            raise SpecError([f"architectures: {n}: no such file ({looked_in(n, base_dir)})"], source)
        try:
            spec = catalog.resolve(n, files=True, base_dir=base_dir)
        except UnknownArchitecture:
            raise SpecError([f"architectures: {n!r} is neither a file, a catalog architecture nor a backend alias"], source) from None
        if spec.name in given:  # results are recorded by name: the second would be dropped (or mixed with the first)
            j, first = given[spec.name]
            what = "is listed twice" if first == n else f"is named {spec.name!r}, as architectures[{j}] ({first!r}) is"
            raise SpecError([f"architectures[{i}]: {n!r} {what} (results are kept per architecture name)"], source)
        given[spec.name] = (i, n)
        out[spec.name] = spec
    return out


# --------------------------------------------------------------------------- the run


def single_generator_model(spec: ArchitectureSpec) -> str | None:
    """The backend alias of an architecture that is one generator sampling one answer from one model (what MMLU's
    logprob mode can score in its place), else None: an ensemble, a fuser or a ranker has no log-probabilities."""
    if len(spec.layers) != 1 or len(spec.layers[0]) != 1:
        return None
    c = spec.layers[0][0]
    models = c.models_used()
    if c.type != "generator" or getattr(c, "samples", 1) != 1 or len(models) != 1:
        return None
    return models[0]


def _traces_field(traces: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A result's trace(s) when the sweep keeps them: `trace` for one turn, `traces` for several."""
    if not traces:
        return {}
    return {"trace": traces[0]} if len(traces) == 1 else {"traces": traces}


@dataclass
class SweepRun:
    spec: SweepSpec
    out_dir: Path
    registry: Any
    runtime: Any
    progress: bool = True
    data_root: str | None = None
    meter: CostMeter = field(default_factory=CostMeter)
    pass_at: dict[tuple[str, str], PassAt] = field(default_factory=dict)  # (benchmark, id) -> its entry's pass_at
    results: Any = None  # a shared store's StoreResults (bench/store.py); default: <out>/results.jsonl

    async def _generate(self, arch: str, spec: ArchitectureSpec | None, messages: list[dict[str, Any]], sample: int = 0,
                        traces: list[dict[str, Any]] | None = None) -> tuple[str, int, Usage]:
        """``traces``: with the sweep's keep_traces, the run's trace is appended there."""
        if spec is None:
            return self.spec.null_text, 0, Usage()
        # Only what the sweep sets: the rest stays the architecture's own (and a selecting last layer's writers get
        # only the answer-shaping ones, FinalOverrides.for_writers). pass@k samples must differ: sample is added to a seed.
        final = self.spec.params.final(sample) if self.spec.params is not None else None
        try:
            res = await self.runtime.run(spec, messages, final=final)
        except GraphError as e:
            if traces is not None and e.trace is not None:
                traces.append(e.trace.to_dict())
            raise
        if traces is not None:
            traces.append(res.trace.to_dict())
        return res.text, int(res.calls), res.usage

    _items: list[tuple[str, ds.Item]] | None = None
    _judge_prompts: dict[str, dict[str, Any]] | None = None

    def check(self, archs: dict[str, ArchitectureSpec | None]) -> None:
        """Everything that would fail mid-run, checked before the first call: the judge alias, that some architecture
        can run the logprob benchmarks (those that cannot are recorded as skipped, the report says so), the data.
        A :class:`SpecError` names the sweep file and field."""
        src = self.spec.source
        judged = sorted({e.name for e in self.spec.benchmarks if e.name in JUDGED})
        if judged:
            if not self.spec.judge:
                raise SpecError([f"judge: the judged benchmarks ({', '.join(judged)}) need a judge: set `judge:` to a backend alias "
                                 f"(known: {', '.join(sorted(self.registry.aliases()))})"], src)
            if self.spec.judge not in self.registry:
                raise SpecError([f"judge: {self.spec.judge!r} is not a backend alias of the server config "
                                 f"(known: {', '.join(sorted(self.registry.aliases()))})"], src)
        known = f"known: {', '.join(sorted(self.registry.aliases()))}"
        for alias in self.spec.backend_concurrency:
            if alias != "default" and alias not in self.registry:  # a misspelt key would cap nothing, silently
                raise SpecError([f"backend_concurrency.{alias}: not a backend alias of the server config ({known})"], src)
        for name, arch in archs.items():  # else every question of it would fail, and be recorded as failed
            if arch is not None and (missing := self.runtime.check_bindings(arch)):
                raise SpecError([f"architectures: {name!r} uses model alias(es) the server config lacks: "
                                 f"{', '.join(missing)} ({known})"], src)
        logprob = [f"benchmarks[{i}]" for i, e in enumerate(self.spec.benchmarks) if e.mode == "logprob"]
        if logprob and all(s is None or single_generator_model(s) is None for s in archs.values()):
            raise SpecError([f"architectures: none of {', '.join(map(repr, archs))} is a single generator of one model, "
                             f"which {', '.join(logprob)} (mode logprob) needs to score one model's letters"], src)
        self.items()

    def _judge_backend(self) -> tuple[Backend, str]:
        if not self.spec.judge:
            raise SpecError(["judge: judged benchmarks need a `judge` backend alias"], self.spec.source)
        # Through the registry's limit, like the architectures' own calls (the sweep's backend_concurrency).
        return self.registry.limited(self.spec.judge), self.registry.model_name(self.spec.judge)

    def _mt_bench_prompts(self) -> dict[str, dict[str, Any]]:
        if self._judge_prompts is None:
            self._judge_prompts = ds.load_mt_bench_judge_prompts(self.data_root)
        return self._judge_prompts

    async def run_item(self, arch: str, spec: ArchitectureSpec | None, item: ds.Item) -> dict[str, Any]:
        rec: dict[str, Any] = {"arch": arch, "benchmark": item.benchmark, "id": item.id}
        usage = Usage()
        calls = 0
        answers: list[str] = []
        traces: list[dict[str, Any]] | None = [] if self.spec.keep_traces else None
        t0 = time.perf_counter()
        if (pk := self.pass_at.get((item.benchmark, item.id))) is not None:
            return await self._run_samples(rec, arch, spec, item, pk, t0)
        if item.benchmark.endswith("_logprob"):
            return await self._run_logprob(rec, spec, item, t0)
        try:
            with cache_scope(f"gen\x1f{arch}\x1f{item.benchmark}\x1f{item.id}"):
                for turn in range(len(item.turns)):
                    text, c, u = await self._generate(arch, spec, item.messages(turn, answers), traces=traces)
                    answers.append(text)
                    calls += c
                    usage.add(u)
        except Exception as e:  # noqa: BLE001 - a failed question is recorded, the sweep goes on
            rec.update(error=f"{type(e).__name__}: {e}", output=None, score=0.0, **_traces_field(traces))
            rec.update(calls=calls, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                       seconds=time.perf_counter() - t0)
            self._count(calls, usage)
            return rec
        rec["seconds"] = time.perf_counter() - t0
        rec.update(_traces_field(traces))
        rec.update(output=answers[0] if len(answers) == 1 else answers, calls=calls,
                   prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
        self._count(calls, usage)
        with cache_scope(f"judge\x1f{arch}\x1f{item.benchmark}\x1f{item.id}"):
            rec.update(await self._score(item, answers))
        return rec

    async def _run_logprob(self, rec: dict[str, Any], spec: ArchitectureSpec | None, item: ds.Item, t0: float) -> dict[str, Any]:
        """MMLU logprob mode: the architecture must be one generator of one model (an ensemble has no log-probabilities).
        Any other (null-model too) is recorded as skipped, with the reason, and makes no call."""
        model = single_generator_model(spec) if spec is not None else None
        if model is None:
            rec.update(error=f"skipped: {LOGPROB_SKIP}", skipped=LOGPROB_SKIP, output=None, score=0.0, calls=0,
                       prompt_tokens=0, completion_tokens=0, seconds=time.perf_counter() - t0)
            return rec
        try:
            g = await grade_mmlu_logprob(self.registry.limited(model), self.registry.model_name(model), item)
        except Exception as e:  # noqa: BLE001 - recorded; the sweep goes on
            rec.update(error=f"{type(e).__name__}: {e}", output=None, score=0.0, seconds=time.perf_counter() - t0)
            return rec
        rec.update(output=g.extracted, score=g.score, correct=g.correct, extracted=g.extracted, grade=g.detail, calls=1,
                   prompt_tokens=int(g.detail.get("prompt_tokens", 0)), completion_tokens=0, seconds=time.perf_counter() - t0)
        self._count(1, Usage(int(g.detail.get("prompt_tokens", 0)), 0))
        return rec

    async def _run_samples(self, rec: dict[str, Any], arch: str, spec: ArchitectureSpec | None, item: ds.Item,
                           pk: PassAt, t0: float) -> dict[str, Any]:
        """pass@k: ``pk.n`` independent answers (concurrently, each its own cache scope), each graded.  With
        keep_traces, ``traces`` holds one trace per sample, in sample order."""
        per_sample: list[list[dict[str, Any]]] | None = [[] for _ in range(pk.n)] if self.spec.keep_traces else None

        async def one(i: int) -> tuple[str, int, Usage]:
            with cache_scope(f"gen\x1f{arch}\x1f{item.benchmark}\x1f{item.id}\x1fsample{i}"):
                return await self._generate(arch, spec, item.messages(0, []), sample=i,
                                            traces=per_sample[i] if per_sample is not None else None)

        def traces() -> dict[str, Any]:
            return {} if per_sample is None else {"traces": [t for ts in per_sample for t in ts]}

        usage = Usage()
        try:
            outs = await asyncio.gather(*(one(i) for i in range(pk.n)))
        except Exception as e:  # noqa: BLE001 - a failed question is recorded, the sweep goes on
            rec.update(error=f"{type(e).__name__}: {e}", output=None, score=0.0, seconds=time.perf_counter() - t0, **traces())
            return rec
        calls = sum(c for _, c, _ in outs)
        for _, _, u in outs:
            usage.add(u)
        self._count(calls, usage)
        texts = [t for t, _, _ in outs]
        grades = await asyncio.gather(*(asyncio.to_thread(grade, item, t) for t in texts))
        c = sum(g.correct for g in grades)
        rec.update(output=texts[0], samples=texts, n_samples=pk.n, n_correct=c, score=c / pk.n, correct=c > 0,
                   pass_at={str(k): pass_at_k(pk.n, c, k) for k in pk.k},
                   calls=calls, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                   seconds=time.perf_counter() - t0, **traces())
        return rec

    def _count(self, calls: int, usage: Usage) -> None:
        self.meter.calls += calls
        self.meter.usage.add(usage)

    def _judge_cap(self) -> dict[str, int]:
        return {} if self.spec.judge_max_tokens is None else {"max_tokens": self.spec.judge_max_tokens}

    def _count_judge(self, usage: Usage, calls: int) -> dict[str, int]:
        self.meter.judge_calls += calls
        self.meter.judge_usage.add(usage)
        return {"judge_calls": calls, "judge_prompt_tokens": usage.prompt_tokens, "judge_completion_tokens": usage.completion_tokens}

    async def _score(self, item: ds.Item, answers: list[str]) -> dict[str, Any]:
        b = item.benchmark
        if b in AUTO_GRADED or b.startswith(("mmlu", "cruxeval")):
            if b.startswith(("cruxeval", "humaneval")):
                g = await asyncio.to_thread(grade, item, answers[0])  # a sandboxed process: wait off the loop
            else:
                # MATH/MMLU grade in this thread: math-verify's SIGALRM timeouts only work in the main thread
                g = grade(item, answers[0])
            return {"score": g.score, "correct": g.correct, "extracted": g.extracted, "grade": g.detail}
        backend, model = self._judge_backend()
        if b == "alpaca_eval":
            j = await AlpacaJudge(backend, model, seed=self.spec.seed).judge(item.prompt, item.reference, answers[0])
            return {"score": j.preference - 1.0, "preference": j.preference, "judge_method": j.method, "swapped": j.swapped,
                    "len_baseline": len(item.reference), "len_model": len(answers[0]), "instruction": item.prompt,
                    **self._count_judge(j.usage, 1)}
        if b == "mt_bench":
            scores = await MTBenchJudge(backend, model, prompts=self._mt_bench_prompts(), **self._judge_cap()).score_both(item, answers)
            u = Usage()
            for s in scores:
                u.add(s.usage)
            vals = [s.score for s in scores if s.score is not None]
            return {"score": sum(vals) / len(vals) if vals else None, "turn_scores": [s.score for s in scores],
                    "category": item.meta.get("category"), **self._count_judge(u, len(scores))}
        if b == "arena_hard":
            games = await ArenaHardJudge(backend, model, **self._judge_cap()).both_orders(item, answers[0])
            u = Usage()
            for g in games:
                u.add(g.usage)
            outs = [o for o in (g.model_outcome() for g in games) if o is not None]
            score = sum(s * w for s, w in outs) / sum(w for _, w in outs) if outs else None
            return {"score": score, "games": [{"model_first": g.model_first, "verdict": g.verdict} for g in games],
                    **self._count_judge(u, len(games))}
        raise ValueError(f"no scorer for benchmark {b!r}")

    def items(self) -> list[tuple[str, ds.Item]]:
        """The sweep's questions, loaded once (the entries were validated with the sweep: names, modes, pass_at).
        Unknown ``ids`` are a :class:`SpecError` naming the entry; missing data a ``DataNotFound``."""
        if self._items is not None:
            return self._items
        out = []
        asked: dict[tuple[str, str], int] = {}  # (benchmark as recorded, question id) -> the entry that asks it
        for i, entry in enumerate(self.spec.benchmarks):
            try:
                items = ds.select(entry.name, split_name=entry.split, n=entry.n, ids=entry.ids,
                                  seed=self.spec.seed if entry.seed is None else entry.seed, root=self.data_root)
            except KeyError as e:
                raise SpecError([f"benchmarks[{i}].ids: {e.args[0]}"], self.spec.source) from None
            if entry.mode == "logprob":
                items = [replace(it, benchmark=f"{it.benchmark}_logprob") for it in items]
            # A result is kept per (architecture, benchmark, question): a question two entries ask would run twice and
            # be counted once, in whichever entry finished first -- the row's n and pass@k would not be what was asked.
            again = sorted({asked[k] for it in items if (k := (it.benchmark, it.id)) in asked})
            if again:
                raise SpecError([f"benchmarks[{i}]: asks {entry.name} questions benchmarks[{again[0]}] asks too (a question "
                                 "is run and counted once per sweep: merge the entries, or give them other splits or ids)"],
                                self.spec.source)
            asked.update({(it.benchmark, it.id): i for it in items})
            out += [(entry.name, it) for it in items]
            if entry.pass_at is not None:
                self.pass_at.update({(it.benchmark, it.id): entry.pass_at for it in items})
        self._items = out
        return out

    async def run(self, archs: dict[str, ArchitectureSpec | None]) -> ResultsLog:
        log = self.results if self.results is not None else ResultsLog(self.out_dir / "results.jsonl")
        todo = [(a, s, it) for a, s in archs.items() for _, it in self.items()
                if result_key(a, it.benchmark, it.id) not in log.done]
        sem = asyncio.Semaphore(self.spec.concurrency)
        report = Reporter(self.progress)
        if log.done:
            report.line(f"{self.spec.name}: resuming, {len(log.done)} results already saved; "
                        + (f"{len(todo)} to run" if todo else "nothing to run"))
        bar = report.bar(len(todo), self.spec.name, "q") if todo else None

        async def one(a: str, s: ArchitectureSpec | None, it: ds.Item) -> None:
            async with sem:
                if not await log.claim(a, it.benchmark, it.id):
                    rec = None  # another worker of a shared store has it (its store waits for it: wait_for_others)
                else:
                    rec = await self.run_item(a, s, it)
            if rec is not None:
                await log.append(rec)
            if bar is not None:
                m = self.meter
                bar.set_postfix(calls=m.calls, tok=m.usage.total_tokens, judge_calls=m.judge_calls, refresh=False)
                bar.update(1)

        def waiting(n: int) -> None:
            """The store waits for ``n`` questions leased by other workers: say so instead of a silent 100%."""
            if bar is not None:
                bar.set_description_str(f"{self.spec.name}: waiting for {n} question(s) leased by other workers")
                bar.refresh()

        try:
            await _all_or_none(one(a, s, it) for a, s, it in todo)
            # A shared store: stay until the questions other workers hold are done, taking over a dead one's.
            while again := await log.wait_for_others(on_wait=waiting):
                retry = [(a, s, it) for a, s, it in todo if result_key(a, it.benchmark, it.id) in again]
                if bar is not None:
                    bar.set_description_str(f"{self.spec.name}: taking over {len(retry)} question(s) of a dead worker")
                    bar.total += len(retry)
                    bar.refresh()
                await _all_or_none(one(a, s, it) for a, s, it in retry)
        finally:
            if bar is not None:
                bar.close()
        return log


async def _all_or_none(coros: Iterable[Any]) -> None:
    """Run the coroutines concurrently; if one raises (or the run is cancelled), cancel the others and wait for them
    before re-raising, so nothing still runs when the caller closes the cache and the backends."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def wrap_registry(registry: Any, spec: SweepSpec, store: CacheStore | None) -> None:
    """Cache every backend (keyed on model+messages+params), then cap its concurrency (the registry's own limit:
    cache hits take a slot too, as they always did).  A key of ``backend_concurrency`` caps the backend its alias names
    (any alias: ``judge`` as well as the backend's own); ``default`` caps the backends no key names."""
    default = spec.backend_concurrency.get("default")
    if store is not None:
        registry.wrap(lambda alias, backend: CachingBackend(backend, store, namespace=alias))
    named = set()
    for alias, limit in spec.backend_concurrency.items():
        if alias != "default" and alias in registry:
            registry.cap(alias, limit)
            named.add(id(registry.get(alias)))
    if default:
        for alias, backend in registry.backends().items():
            if id(backend) not in named:
                registry.cap(alias, default)


async def run_sweep(
    spec: SweepSpec,
    out_dir: str | Path,
    *,
    registry: Any | None = None,
    config: Any | None = None,
    config_path: str | None = None,
    base_dir: Path | None = None,
    cache: bool = True,
    progress: bool = True,
    data_root: str | None = None,
    store_url: str | None = None,
    store_lease_s: float = 60.0,
) -> ResultsLog:
    """Run (or resume) a sweep; returns the results log (all records, old and new).

    ``store_url``: share the sweep with other workers through that database (bench/store.py); this
    worker's ``<out>/results.jsonl`` is then written from the store when it finishes."""
    from ..graph.runtime import GraphRuntime

    out = Path(out_dir)
    if store_url is None:
        check_resume(spec, out)  # a shared store compares with its own copy (StoreResults.register)
    own_registry = registry is None
    if registry is None:
        from ..backends.registry import build_registry
        from ..config import load_config

        cfg_path = None
        if config is None and (given := config_path or spec.config):
            # --config wins over the sweep's `config:`; either is found as an architecture file is (graph.catalog's
            # find_file: the sweep's folder, then the working directory). Missing from both: the path as given, where
            # it was looked for (in that order), and who named it.
            from ..graph.catalog import find_file, looked_in

            found = find_file(given, base_dir)
            if found is None:
                raise SpecError([f"{'--config' if config_path else 'config'}: {given}: no such file "
                                 f"({looked_in(given, base_dir)})"], None if config_path else spec.source)
            cfg_path = str(found)
        config = config or load_config(cfg_path)
        registry = build_registry(config)
    archs = resolve_architectures(spec.architectures, registry, config, base_dir, source=spec.source)
    run = SweepRun(spec, out, registry, GraphRuntime(registry), progress=progress, data_root=data_root)
    run.check(archs)  # judge, logprob architectures, data: before any call, before the store records the definition
    shared = None
    if store_url:
        from .store import SweepStore

        shared = SweepStore(store_url, spec.name, lease_s=store_lease_s)
        try:
            shared.results.register(sweep_definition(spec), source=spec.source)
        except BaseException:
            shared.close()
            raise
        run.results = shared.results
    out.mkdir(parents=True, exist_ok=True)
    store = (shared.calls if shared is not None else CacheStore(out / "cache.sqlite")) if cache else None
    wrap_registry(registry, spec, store)
    (out / "sweep.json").write_text(json.dumps(sweep_definition(spec), indent=2), encoding="utf-8")
    if own_registry:
        await registry.start()
    started = time.time()
    before = 0
    try:
        before = len(ResultsLog(out / "results.jsonl").records)
        if shared is None:
            log = await run.run(archs)
        else:
            async with shared.results:
                await run.run(archs)
            shared.results.export_jsonl(out / "results.jsonl")
            log = ResultsLog(out / "results.jsonl")
    finally:
        _append_run_stats(out, run, registry, started, before)
        if own_registry:
            await registry.close()
        if store is not None:
            store.close()
        if shared is not None:
            shared.close()
    return log


def _cache_counts(registry: Any) -> tuple[int, int]:
    hits = misses = 0
    for b in registry.backends().values():
        while b is not None:
            if isinstance(b, CachingBackend):
                hits += b.hits
                misses += b.misses
                break
            b = getattr(b, "inner", None)
    return hits, misses


def _engine_stats(registry: Any) -> dict[str, dict[str, Any]]:
    """Each backend's own numeric counters at the end of the run (the embedded engine's batch sizes and
    prefix-cache hits: where a sweep's time went), unwrapping the sweep's caching layer."""
    stats = {alias: numeric_stats(b) for alias, b in registry.backends().items()}
    return {alias: nums for alias, nums in stats.items() if nums}


def _append_run_stats(out: Path, run: SweepRun, registry: Any, started: float, before: int) -> None:
    """One line per invocation in ``runs.jsonl``: what this (possibly resumed) run cost and re-used."""
    hits, misses = _cache_counts(registry)
    after = len(ResultsLog(out / "results.jsonl").records)
    m = run.meter
    stats = {"started": started, "seconds": round(time.time() - started, 2), "records_before": before, "records_after": after,
             "calls": m.calls, "prompt_tokens": m.usage.prompt_tokens, "completion_tokens": m.usage.completion_tokens,
             "judge_calls": m.judge_calls, "cache_hits": hits, "cache_misses": misses, "backends": _engine_stats(registry)}
    with open(out / "runs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(stats) + "\n")
