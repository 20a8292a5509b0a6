"""Architecture specification: the typed, validated description of an ensemble.

This module is a leaf: it imports nothing from the rest of the package but the other leaves (``exceptions``, and
``sampling_fields``, whose bounds its sampling fields use), so the CLI, the HTTP layer, the runtime, the benchmark
and the search code may all use it.

An architecture is a list of *layers*; a layer is a list of *components* that run
concurrently and read/write a shared state (candidates, critiques, unit tests,
votes).  The file format is YAML (JSON is accepted: it is a subset of YAML).
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Container
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from .exceptions import ArchonError
from .sampling_fields import MaxTokens, Seed, Stop, Temperature, TopP


class SpecError(ArchonError, ValueError):
    """An architecture (or config) failed validation; ``errors`` holds ``path: message`` lines."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = errors
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(errors))


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Sampling(_Base):
    """Sampling settings of one component's backend calls (unset = inherit)."""

    # The bounds are the API's (sampling_fields): an architecture may hold what a request may send, with the same words.
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    seed: Seed | None = None
    stop: Stop | None = None


class _Component(Sampling):
    id: str | None = Field(default=None, description="Optional name used in traces.")
    model: str | None = Field(default=None, description="Backend alias that runs this component.")
    system_prompt: str | None = Field(default=None, description="Overrides the component's default system prompt.")

    def models_used(self) -> list[str]:
        return [self.model] if self.model else []

    def needs_model(self) -> bool:
        return True

    @model_validator(mode="after")
    def _model_required(self) -> "_Component":
        if self.needs_model() and not self.model:
            raise ValueError(f"a {getattr(self, 'type', 'component')} needs `model` (a backend alias)")
        return self


class GeneratorSpec(_Component):
    """Samples candidates. ``samples`` of one model go out as one ``n=k`` request when the backend allows it."""

    type: Literal["generator"] = "generator"
    models: list[str] | None = Field(default=None, description="Several models, each sampled `samples` times.")
    samples: int = Field(default=1, ge=1, le=256)

    def needs_model(self) -> bool:
        if not self.model and not self.models:
            raise ValueError("a generator needs `model` or `models`")
        return False

    def models_used(self) -> list[str]:
        return list(self.models or []) + ([self.model] if self.model else [])


class FuserSpec(_Component):
    """Mixture-of-Agents aggregate-and-synthesize over the current candidates."""

    type: Literal["fuser"] = "fuser"
    samples: int = Field(default=1, ge=1, le=64, description="How many fused candidates to produce.")
    use_critiques: bool = True
    length_control: int | None = Field(default=None, ge=1, description="Ask for an answer of about this many words.")
    max_candidates: int = Field(default=24, ge=1, le=64, description="At most this many candidates go into one prompt.")


class RankerSpec(_Component):
    """Listwise ranking of the candidates; keeps the ``top_k`` best."""

    type: Literal["ranker"] = "ranker"
    top_k: int = Field(default=5, ge=1, le=256)


class CriticSpec(_Component):
    """Strengths and weaknesses of every candidate.

    Default: one call that critiques all candidates (Archon's critic). ``per_candidate``:
    one call per candidate, all concurrently (shorter prompts, more calls).
    """

    type: Literal["critic"] = "critic"
    per_candidate: bool = False


class VerifierSpec(_Component):
    """Reasoning then [Correct]/[Incorrect] per candidate; keeps those that pass."""

    type: Literal["verifier"] = "verifier"


class UnitTestGeneratorSpec(_Component):
    """Writes unit tests (natural-language checks) for the query."""

    type: Literal["unit_test_generator"] = "unit_test_generator"
    num_tests: int = Field(default=5, ge=1, le=50)
    style: Literal["natural", "assert"] = Field(
        default="natural", description="`natural`: checks for an LLM judge; `assert`: Python asserts for the executed evaluator."
    )


class UnitTestEvaluatorSpec(_Component):
    """Judges each candidate against the unit tests (LLM-judged, as Archon does) and keeps the best."""

    type: Literal["unit_test_evaluator"] = "unit_test_evaluator"
    top_k: int = Field(default=1, ge=1, le=256)
    mode: Literal["llm", "executed"] = Field(default="llm", description="`executed` runs each candidate's code against the tests in the sandbox (no model).")

    def needs_model(self) -> bool:
        return self.mode == "llm"


class SelfMoASeqSpec(_Component):
    """Sequential Self-MoA: aggregate many samples through a sliding window.

    Each window holds the best synthesis so far (repeated ``repeat_best`` times to
    bias the aggregator towards it) plus ``window - repeat_best`` new samples.  If
    ``proposer`` is set the component draws ``samples`` samples itself and
    consumes them as they arrive; otherwise it aggregates the incoming candidates.
    """

    type: Literal["self_moa_seq"] = "self_moa_seq"
    proposer: str | None = None
    samples: int = Field(default=12, ge=1, le=1024)
    window: int = Field(default=6, ge=2, le=64)
    repeat_best: int = Field(default=1, ge=1, le=8)
    proposer_temperature: Temperature | None = None

    def needs_model(self) -> bool:
        return True

    @model_validator(mode="after")
    def _window(self) -> "SelfMoASeqSpec":
        if self.repeat_best >= self.window:
            raise ValueError("repeat_best must be < window")
        return self

    def models_used(self) -> list[str]:
        return [m for m in (self.model, self.proposer) if m]


class ExtractorSpec(_Base):
    kind: Literal["boxed", "choice", "regex", "number", "text"] = "boxed"
    pattern: str | None = Field(default=None, description="Regex for kind=regex; group 1 (or the whole match) is the answer.")
    choices: str = Field(default="ABCD", description="Allowed letters for kind=choice.")

    @model_validator(mode="after")
    def _pattern(self) -> "ExtractorSpec":
        if self.kind == "regex":
            if not self.pattern:
                raise ValueError("kind=regex needs `pattern`")
            import re

            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"invalid regex: {e}") from e
        return self


class Exemplar(_Base):
    query: str
    response: str


class ScorerSpec(_Component):
    """Ranks the candidates by scores computed from log-probabilities (no text is generated) and keeps ``top_k``.

    Methods:

    - ``density_ratio`` (CDR): ``log p_model(y|x) - log p_weak(y|x)``, ``model`` the better-aligned model,
      ``weak`` the less-aligned one (e.g. instruct over base); the two may have different tokenizers.
      ``length_normalize`` divides each log-prob by its own token count; ``criteria`` (a system message) and
      ``exemplars`` (example turns) go into the strong model's prompt only.
    - ``logprob_judge``: pointwise expected rating, the probability-weighted mean of "1".."10" read from the
      judge's next-token log-probabilities (one call per candidate).
    - ``pairwise``: a tournament of AlpacaEval-style preferences (P("a") vs P("b") of the next token, both
      presentation orders averaged), round-robin up to ``round_robin_max`` candidates, knockout beyond;
      Bradley-Terry turns the results into scores. ``pair_scorer: reward_model`` compares rewards instead.
    - ``reward_model``: one call to a reward / sequence-classification model served over HTTP
      (``reward_protocol``: vLLM's Score API ``vllm_score`` or text-embeddings-inference ``tei_rerank``).

    Whatever the method, ``prefer_complete`` (default) scores only the complete candidates when there is one: those
    cut at the length limit are set aside first, so ``top_k`` may keep fewer than it says.
    """

    type: Literal["scorer"] = "scorer"
    method: Literal["density_ratio", "logprob_judge", "pairwise", "reward_model"] = "density_ratio"
    top_k: int = Field(default=1, ge=1, le=256)
    weak: str | None = Field(default=None, description="density_ratio: alias of the less-aligned (e.g. base) model.")
    length_normalize: bool = Field(default=False, description="density_ratio: per-token log-probs (each model's own count).")
    criteria: str | None = Field(default=None, description="density_ratio: system message given to the strong model only.")
    exemplars: list[Exemplar] = Field(default_factory=list, description="density_ratio: example turns in the strong model's prompt.")
    pair_scorer: Literal["logprob_judge", "reward_model"] = Field(default="logprob_judge", description="pairwise: what compares two candidates.")
    round_robin_max: int = Field(default=8, ge=2, le=64, description="pairwise: up to this many candidates every pair meets; beyond, a knockout.")
    reward_protocol: Literal["vllm_score", "tei_rerank"] = "vllm_score"
    top_logprobs: int = Field(default=20, ge=2, le=100, description="logprob judges: next-token alternatives read.")
    prefer_complete: bool = Field(
        default=True,
        description="Candidates cut at the length limit (finish_reason `length`) are set aside, unscored, when one is "
        "complete: an answer cut mid-sentence never beats a complete one (the density ratio, a sum over tokens, favours "
        "the longer). False: every candidate is scored.",
    )

    @model_validator(mode="after")
    def _weak(self) -> "ScorerSpec":
        if self.method == "density_ratio" and not self.weak:
            raise ValueError("method density_ratio needs `weak` (the less-aligned model's alias)")
        return self

    def models_used(self) -> list[str]:
        return [m for m in (self.model, self.weak if self.method == "density_ratio" else None) if m]

    def scoring_needs(self) -> list[tuple[str, str, str]]:
        """(alias, capability, reward protocol) this scorer relies on: checked when the server starts."""
        assert self.model is not None
        if self.method == "density_ratio":
            return [(self.model, "score", ""), (self.weak or "", "score", "")]
        if self.method == "reward_model" or (self.method == "pairwise" and self.pair_scorer == "reward_model"):
            return [(self.model, "reward", self.reward_protocol)]
        return [(self.model, "next_token", "")]


class VoteSpec(_Base):
    """Majority vote / self-consistency over answers extracted from the candidates (no backend call)."""

    type: Literal["vote"] = "vote"
    id: str | None = None
    extractor: ExtractorSpec = Field(default_factory=ExtractorSpec)

    def models_used(self) -> list[str]:
        return []


ComponentSpec = Annotated[
    Union[
        GeneratorSpec,
        FuserSpec,
        RankerSpec,
        CriticSpec,
        VerifierSpec,
        UnitTestGeneratorSpec,
        UnitTestEvaluatorSpec,
        SelfMoASeqSpec,
        VoteSpec,
        ScorerSpec,
    ],
    Field(discriminator="type"),
]

COMPONENT_TYPES = (
    "generator",
    "fuser",
    "ranker",
    "critic",
    "verifier",
    "unit_test_generator",
    "unit_test_evaluator",
    "self_moa_seq",
    "vote",
    "scorer",
)


class ArchitectureSpec(_Base):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    description: str = ""
    defaults: Sampling = Field(default_factory=Sampling, description="Sampling inherited by every component.")
    layers: list[list[ComponentSpec]] = Field(min_length=1)
    min_success: int = Field(default=1, ge=1, description="A layer goes on when at least this many of its calls succeeded.")
    final: Literal["first", "top_ranked"] = Field(
        default="top_ranked",
        description="If several candidates remain: `top_ranked` takes the best-scored one (ranker/verifier/vote order), "
        "`first` the first in layer order. Ties keep layer order; never random.",
    )
    deadline_s: float | None = Field(default=None, gt=0, description="Per-request deadline for the whole graph.")
    tools_in_prompt: bool = Field(
        default=False,
        description="With a request's `tools`: describe them to every layer in a system note, so proposers can plan "
        "for the calls the final stage may make (only the final stage is ever given the tools themselves).",
    )

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: list[list[Any]]) -> list[list[Any]]:
        for i, layer in enumerate(layers):
            if not layer:
                raise ValueError(f"layer {i} is empty")
        return layers

    @model_validator(mode="after")
    def _structure(self) -> "ArchitectureSpec":
        first = self.layers[0]
        if not any(c.type in ("generator", "self_moa_seq") and (c.type == "generator" or c.proposer) for c in first):
            raise ValueError("the first layer must contain a generator (or a self_moa_seq with a proposer)")
        return self

    def scoring_needs(self) -> list[tuple[str, str, str]]:
        """(alias, capability, protocol) of every scorer: what the backends must support (Backend.check_scoring)."""
        seen: dict[tuple[str, str, str], None] = {}
        for layer in self.layers:
            for c in layer:
                if isinstance(c, ScorerSpec):
                    for need in c.scoring_needs():
                        seen[need] = None
        return list(seen)

    def models_used(self) -> list[str]:
        seen: dict[str, None] = {}
        for layer in self.layers:
            for c in layer:
                for m in c.models_used():
                    seen[m] = None
        return list(seen)

    def backend_calls_estimate(self, n_candidates: int = 0) -> int:
        """Upper bound of backend calls per query (used by budgets in search)."""
        return self._flow(n_candidates)[0]

    def answers_bound(self) -> int:
        """Upper bound of the answers the last layer leaves (its writers' samples; a selector's top_k of its input)."""
        return self._flow()[1]

    def _flow(self, n_candidates: int = 0) -> tuple[int, int]:
        """(backend calls, candidates after the last layer), each an upper bound, layer by layer."""
        calls = 0
        cands = n_candidates
        tests = False
        for layer in self.layers:
            new = 0
            keep = None
            for c in layer:
                if isinstance(c, GeneratorSpec):
                    calls += len(c.models_used())
                    new += len(c.models_used()) * c.samples
                elif isinstance(c, FuserSpec):
                    calls += 1
                    new += c.samples
                elif isinstance(c, ScorerSpec):
                    k = max(cands, 1)
                    if c.method == "density_ratio":
                        calls += 2
                    elif c.method == "logprob_judge":
                        calls += k
                    elif c.method == "reward_model" or c.pair_scorer == "reward_model":
                        calls += 1
                    else:  # both orders of every pair (round-robin) or of every match (knockout: k - 1 matches)
                        calls += 2 * (k * (k - 1) // 2 if k <= c.round_robin_max else k - 1)
                    keep = min(c.top_k, cands)
                elif isinstance(c, RankerSpec):
                    calls += 1
                    keep = min(c.top_k, cands)
                elif isinstance(c, CriticSpec):
                    calls += cands if c.per_candidate else 1
                elif isinstance(c, VerifierSpec):
                    calls += cands
                elif isinstance(c, UnitTestGeneratorSpec):
                    calls += 1
                    tests = True
                elif isinstance(c, UnitTestEvaluatorSpec):
                    calls += cands if tests else 0
                    keep = min(c.top_k, cands)
                elif isinstance(c, SelfMoASeqSpec):
                    src = c.samples if c.proposer else cands
                    step = c.window - c.repeat_best
                    windows = 1 + -(-max(src - c.window, 0) // step)
                    calls += windows * (2 if c.proposer else 1)  # one n=chunk request + one aggregation per window
                    new += 1
            cands = new if new else (keep if keep is not None else cands)
        return calls, cands


# The names pydantic gives a union's branches in an error's location (``stop.str``, ``content.list[TextPart]``,
# ``function-after[stop_list(), ...]``, ``constrained-str``): a type's name, never a field's. Every field and key of a
# request or an architecture is a lowercase name without brackets, other than these.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "none", "any", "decimal", "date", "datetime", "uuid"})


def is_union_tag(part: Any) -> bool:
    """Whether a location segment is pydantic's name for a union branch (or a validator wrapping one), not a field."""
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part.startswith(("function-", "constrained-")))


def format_loc(loc: tuple[Any, ...], tags: Container[str] = ()) -> str:
    """Turn a pydantic error location into ``layers[2][0].top_k`` (discriminator tags, union branch names, and
    ``tags``, dropped: ``stop.str`` is ``stop``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in COMPONENT_TYPES or part in tags or is_union_tag(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def error_message(err: Any) -> str:
    """One pydantic error's words, without the "Value error, " pydantic puts before a validator's own ValueError
    (the config files' errors and the API's 400s say what the validator said)."""
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")


def validation_messages(err: ValidationError, tags: Container[str] = ()) -> list[str]:
    return [f"{format_loc(tuple(e['loc']), tags)}: {error_message(e)}" for e in err.errors()]


_adapter = TypeAdapter(ArchitectureSpec)


def parse_architecture(data: Any, source: str | None = None) -> ArchitectureSpec:
    """Validate a decoded mapping; raise :class:`SpecError` with path-named messages."""
    if not isinstance(data, dict):
        raise SpecError(["<root>: an architecture must be a mapping"], source)
    try:
        return _adapter.validate_python(data)
    except ValidationError as e:
        raise SpecError(validation_messages(e), source) from None


def load_text(text: str, source: str | None = None) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError([f"<root>: not valid YAML/JSON: {e}"], source) from None


def load_architecture(path: str | Path) -> ArchitectureSpec:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"<root>: cannot read: {e.strerror}"], str(p)) from None
    data = load_text(text, str(p))
    if isinstance(data, dict) and "name" not in data:
        data = {"name": p.stem, **data}
    return parse_architecture(data, str(p))


def dump_architecture(spec: ArchitectureSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True, exclude_defaults=False), sort_keys=False)


def json_schema() -> str:
    return json.dumps(ArchitectureSpec.model_json_schema(), indent=2)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


_ARCHON_KEYS = {"model", "temperature", "max_tokens", "samples", "top_k", "model_type", "type", "length_control", "checkpoint"}


def import_archon(data: dict[str, Any], source: str | None = None) -> ArchitectureSpec:
    """Convert an Archon JSON config (``{"name", "layers": [[{"type", "model", ...}]]}``) into our spec.

    Archon's ``model_type`` (which provider to call) has no equivalent: the backend
    registry decides; it is dropped.  Unknown keys are reported, never silently kept.
    """
    errors: list[str] = []
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise SpecError(["<root>: an Archon config needs a `layers` list"], source)
    layers: list[list[dict[str, Any]]] = []
    for i, layer in enumerate(data["layers"]):
        if not isinstance(layer, list):
            errors.append(f"layers[{i}]: must be a list")
            continue
        out_layer = []
        for j, comp in enumerate(layer):
            if not isinstance(comp, dict):
                errors.append(f"layers[{i}][{j}]: must be a mapping")
                continue
            unknown = set(comp) - _ARCHON_KEYS
            if unknown:
                errors.append(f"layers[{i}][{j}]: unknown Archon keys {sorted(unknown)}")
            t = comp.get("type")
            c: dict[str, Any] = {"type": t, "model": comp.get("model")}
            for k in ("temperature", "max_tokens"):
                if comp.get(k) is not None:
                    c[k] = comp[k]
            if t == "generator":
                c["samples"] = comp.get("samples", 1)
            elif t == "fuser":
                c["samples"] = comp.get("samples", 1)
                if comp.get("length_control"):
                    c["length_control"] = 200
            elif t in ("ranker",):
                c["top_k"] = comp.get("top_k", 5)
            elif t == "unit_test_evaluator":
                c["top_k"] = comp.get("top_k", 1) or 1
            out_layer.append(c)
        layers.append(out_layer)
    if errors:
        raise SpecError(errors, source)
    return parse_architecture({"name": str(data.get("name", "imported")).replace(" ", "-"), "layers": layers}, source)
