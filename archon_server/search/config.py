"""Search configuration files (``search/*.yaml``): study settings, objective, budget, evaluation and space.

One file describes one search: which models are in the pool, which Archon axes are
searched and over which ranges, how a trial is scored and how much it may cost.
Validation is pydantic; errors name the path inside the file (``space.samples_per_model.high: ...``)
through the spec module's formatter so the messages look like architecture errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from archon_server.sampling_fields import Temperature
from archon_server.spec import SpecError, load_text, validation_messages


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IntAxis(_Base):
    """An integer axis ``low..high`` (inclusive). ``low == high`` fixes it (no Optuna parameter is created)."""

    low: int = Field(ge=0)
    high: int = Field(ge=0)
    step: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _order(self) -> "IntAxis":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) < low ({self.low})")
        return self

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))


def _int_axis(v: Any) -> Any:
    # Shorthands: `3` fixes the axis, `[1, 5]` is a range.
    if isinstance(v, int) and not isinstance(v, bool):
        return {"low": v, "high": v}
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return {"low": v[0], "high": v[1]}
    return v


class ModelEntry(_Base):
    """A pool model: a backend alias and (optionally) its single-model dev score, which ranks the pool."""

    name: str = Field(min_length=1)
    score: float | None = Field(default=None, ge=0.0, le=1.0)


Family = Literal["moa", "self_moa", "self_moa_seq"]
FinalLayer = Literal["none", "verifier", "unit_test", "vote"]
ScorerMethod = Literal["none", "density_ratio", "logprob_judge", "pairwise"]


class SpaceConfig(_Base):
    """Archon's search axes plus Self-MoA / Self-MoA-Seq.

    ``moa``: top-k models of the pool (ranked by single-model score), each sampled
    ``samples_per_model`` times, then ``fusion_layers`` layers of ``fusers_per_layer``
    fusers, optionally preceded by a critic and/or a ranker, then an optional final layer.
    ``self_moa``: the same graph on one model (``self_moa_model_rank``) sampled
    ``self_moa_samples`` times and fused by itself.
    ``self_moa_seq``: one sliding-window sequential aggregator over one model's samples.
    """

    families: list[Family] = Field(default_factory=lambda: ["moa"], min_length=1)
    top_k_models: IntAxis = Field(default_factory=lambda: IntAxis(low=1, high=3))
    samples_per_model: IntAxis = Field(default_factory=lambda: IntAxis(low=1, high=3))
    temperatures: list[Temperature] = Field(default_factory=lambda: [0.7], min_length=1)  # the API's bounds
    fusion_layers: IntAxis = Field(default_factory=lambda: IntAxis(low=0, high=2))
    fusers_per_layer: IntAxis = Field(default_factory=lambda: IntAxis(low=1, high=2))
    fuser_model_rank: IntAxis = Field(default_factory=lambda: IntAxis(low=0, high=0), description="0 = best pool model fuses.")
    critic: list[bool] = Field(default_factory=lambda: [False, True], min_length=1)
    ranker: list[bool] = Field(default_factory=lambda: [False, True], min_length=1)
    ranker_top_k: IntAxis = Field(default_factory=lambda: IntAxis(low=5, high=5))
    scorer: list[ScorerMethod] = Field(
        default_factory=lambda: ["none"], min_length=1,
        description="A scoring filter (no generation) before critic/ranker/fusion: none or a scorer method.",
    )
    scorer_top_k: IntAxis = Field(default_factory=lambda: IntAxis(low=3, high=3))
    scorer_weak: str | None = Field(default=None, description="density_ratio: alias of the less-aligned model.")
    final: list[FinalLayer] = Field(default_factory=lambda: ["none"], min_length=1)
    vote_extractor: Literal["boxed", "choice", "number", "text"] = "boxed"
    self_moa_model_rank: IntAxis = Field(default_factory=lambda: IntAxis(low=0, high=0))
    self_moa_samples: IntAxis = Field(default_factory=lambda: IntAxis(low=4, high=8, step=2))
    seq_samples: IntAxis = Field(default_factory=lambda: IntAxis(low=6, high=12, step=6))
    seq_window: IntAxis = Field(default_factory=lambda: IntAxis(low=4, high=6, step=2))
    max_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for k, f in cls.model_fields.items():
                if k in data and f.annotation is IntAxis:
                    data[k] = _int_axis(data[k])
        return data

    @model_validator(mode="after")
    def _windows(self) -> "SpaceConfig":
        if "self_moa_seq" in self.families and self.seq_window.low < 2:
            raise ValueError("seq_window.low must be >= 2")
        if "density_ratio" in self.scorer and not self.scorer_weak:
            raise ValueError("scorer density_ratio needs scorer_weak (the less-aligned model's alias)")
        return self


class SamplerConfig(_Base):
    type: Literal["tpe", "random", "nsga2", "gp", "bruteforce"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(default=10, ge=0)
    population_size: int = Field(default=20, ge=2, description="NSGA-II only.")


class PrunerConfig(_Base):
    type: Literal["none", "median", "percentile", "successive_halving", "hyperband"] = "median"
    n_startup_trials: int = Field(default=5, ge=0)
    n_warmup_steps: int = Field(default=0, ge=0)
    percentile: float = Field(default=50.0, gt=0, lt=100)
    reduction_factor: int = Field(default=3, ge=2)


class StudyConfig(_Base):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    storage: str | None = Field(default=None, description="Optuna RDB URL; default sqlite:///runs/search/<name>.db")
    n_trials: int = Field(default=30, ge=1, description="Target number of evaluated trials over the whole study (all workers).")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    heartbeat_interval: int | None = Field(default=10, ge=1, description="Seconds; None disables stale-trial detection.")
    grace_period: int | None = Field(default=None, ge=1, description="Seconds without heartbeat before a trial is failed (default 2x interval).")
    max_retry: int | None = Field(default=2, ge=0, description="Retries of a trial whose worker died.")
    max_attempts_factor: int = Field(default=10, ge=1, description="Stop after n_trials x this many attempts (rejections included).")
    converged_after: int = Field(default=50, ge=1, description="A worker stops after this many consecutive free trials "
                                 "(duplicates/rejections): the sampler keeps proposing what is known.")


class ObjectiveConfig(_Base):
    mode: Literal["scalar", "pareto"] = "scalar"
    cost: Literal["calls", "tokens"] = "calls"
    lam: float = Field(default=0.0, ge=0.0, alias="lambda", description="score - lambda * cost-per-query (scalar mode).")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class BudgetConfig(_Base):
    max_calls_per_query: int | None = Field(default=None, ge=1, description="Upper bound from spec.backend_calls_estimate().")
    max_fuser_inputs: int = Field(default=24, ge=1, description="At most this many candidates into one fuser.")


class ScriptedConfig(_Base):
    """Settings of the synthetic evaluator (tests, benchmarks, dry runs)."""

    n_dev: int = Field(default=40, ge=1)
    n_test: int = Field(default=160, ge=1)
    noise: float = Field(default=0.0, ge=0.0, le=0.5)
    step_sleep_s: float = Field(default=0.0, ge=0.0, description="Sleep per question (to make trials slow in tests).")
    seed: int = 0


class EvaluationConfig(_Base):
    evaluator: Literal["scripted", "bench"] = "scripted"
    dataset: str | None = Field(default=None, description="bench dataset name (evaluator=bench).")
    backends: str | None = Field(default=None, description="Server config file whose backends are the pool (evaluator=bench; "
                                 "None = the embedded default model).")
    judge: str | None = Field(default=None, description="Backend alias of the judge for judged datasets (alpaca_eval, mt_bench...).")
    seed: int = Field(default=0, description="Dev/test split and subset order.")
    stages: list[int] = Field(default_factory=lambda: [5, 10], description="Dev subset sizes evaluated (and reported) before the full dev split.")
    dev_limit: int | None = Field(default=None, ge=1, description="Cap on the 'full' dev split.")
    test_top: int = Field(default=3, ge=0, description="Score this many best trials on the test split at the end.")
    test_limit: int | None = Field(default=None, ge=1)
    baselines: bool = True
    concurrency: int = Field(default=4, ge=1)
    scripted: ScriptedConfig = Field(default_factory=ScriptedConfig)

    @model_validator(mode="after")
    def _stages(self) -> "EvaluationConfig":
        if any(s < 1 for s in self.stages) or self.stages != sorted(set(self.stages)):
            raise ValueError("stages must be strictly increasing positive subset sizes")
        return self


class ExportConfig(_Base):
    name: str | None = Field(default=None, description="Architecture name (default: <study>-best).")
    dir: str = "architectures"
    report_dir: str = "runs/search"


class SearchConfig(_Base):
    study: StudyConfig
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    models: list[ModelEntry] = Field(min_length=1)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    _source: str | None = PrivateAttr(default=None)  # the file it was loaded from (messages, relative paths)

    @property
    def source(self) -> str | None:
        """The config file's path as given (None for a config built in code)."""
        return self._source

    def resolve_path(self, value: str) -> Path:
        """A path written in the config, the way sweeps resolve theirs: as given when it exists (relative to the
        working directory), else relative to the config file's folder."""
        p = Path(value)
        if p.is_absolute() or p.exists() or self._source is None:
            return p
        return Path(self._source).parent / p

    @model_validator(mode="after")
    def _consistent(self) -> "SearchConfig":
        n = len(self.models)
        names = [m.name for m in self.models]
        if len(set(names)) != n:
            raise ValueError("models: duplicate names")
        for field in ("top_k_models",):
            if getattr(self.space, field).high > n:
                raise ValueError(f"space.{field}.high ({getattr(self.space, field).high}) exceeds the pool size ({n})")
        if self.space.top_k_models.low < 1:
            raise ValueError("space.top_k_models.low must be >= 1")
        for field in ("fuser_model_rank", "self_moa_model_rank"):
            if getattr(self.space, field).high >= n:
                raise ValueError(f"space.{field}.high must be < pool size ({n})")
        if self.study.sampler.type == "nsga2" and self.objective.mode != "pareto":
            raise ValueError("study.sampler.type: nsga2 needs objective.mode: pareto")
        return self

    def storage_url(self) -> str:
        return self.study.storage or default_storage_url(self.study.name)


def default_storage_url(study: str, root: str = "runs/search") -> str:
    return f"sqlite:///{root}/{study}.db"


def parse_search_config(data: Any, source: str | None = None) -> SearchConfig:
    if not isinstance(data, dict):
        raise SpecError(["<root>: a search config must be a mapping"], source)
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as e:
        # A whole-config rule names its own field (`space.top_k_models.low must be >= 1`): not `<root>: space...`.
        raise SpecError([m.removeprefix("<root>: ") if m.startswith(_ROOT_FIELDS) else m for m in validation_messages(e)],
                        source) from None


_ROOT_FIELDS = tuple(f"<root>: {key}" for key in ("study", "objective", "budget", "evaluation", "models", "space", "export"))


def load_search_config(path: str | Path) -> SearchConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"<root>: cannot read: {e.strerror}"], str(p)) from None
    config = parse_search_config(load_text(text, str(p)), str(p))
    config._source = str(p)
    return config
