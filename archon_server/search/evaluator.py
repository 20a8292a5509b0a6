"""How a trial's architecture gets a score: the :class:`Evaluator` protocol and a scripted evaluator.

The search never calls a backend itself: it hands an :class:`ArchitectureSpec` to
an evaluator and gets back an :class:`EvalResult`.  The real evaluator
(:mod:`archon_server.search.bench_eval`) runs the graph runtime over a bench
dataset; :class:`ScriptedEvaluator` computes a *known* quality from the shape of
the graph, so tests and the efficiency benchmark know the optimum in advance.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from archon_server.search.space import architecture_key, candidate_flow
from archon_server.spec import (
    ArchitectureSpec,
    CriticSpec,
    FuserSpec,
    GeneratorSpec,
    RankerSpec,
    SelfMoASeqSpec,
    UnitTestEvaluatorSpec,
    VerifierSpec,
    VoteSpec,
)

StepCallback = Callable[[int, int], None]  # (questions done, questions planned)


@dataclass
class EvalResult:
    """Score of one architecture on (a prefix of) one split. ``calls``/``tokens`` are totals over the questions."""

    score: float
    n: int
    calls: int = 0
    tokens: int = 0
    per_question: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    @property
    def calls_per_query(self) -> float:
        return self.calls / self.n if self.n else 0.0

    @property
    def tokens_per_query(self) -> float:
        return self.tokens / self.n if self.n else 0.0

    def cost(self, kind: str) -> float:
        return self.calls_per_query if kind == "calls" else self.tokens_per_query


@runtime_checkable
class Evaluator(Protocol):
    """Scores an architecture on the first ``limit`` questions of ``split`` ("dev" or "test").

    Evaluating a longer prefix after a shorter one must not pay twice for the shared
    questions (the bench call cache does that for the real evaluator), which is what
    makes cheap-first staging free of waste.
    """

    async def evaluate(
        self, spec: ArchitectureSpec, split: str, limit: int | None = None, on_step: StepCallback | None = None
    ) -> EvalResult: ...

    def split_size(self, split: str) -> int: ...


@dataclass
class Landscape:
    """Coefficients of the scripted quality function (see :meth:`quality`)."""

    model_scores: dict[str, float]
    diversity: float = 0.04  # per extra distinct model (log)
    sampling: float = 0.02  # per doubling of samples (log2)
    fuse_gain: float = 0.12  # first fusion layer, times the fuser model's score
    fuse_decay: float = 0.4  # each further fusion layer gains this fraction of the previous
    critic: float = 0.25  # relative boost of a fusion gain when a critic feeds it
    ranker: float = 0.15  # relative boost of a fusion gain when a ranker feeds it
    sweet_inputs: int = 9  # fusers degrade beyond this many inputs
    overload: float = 0.01  # per input beyond sweet_inputs
    verifier: float = 0.02
    unit_test: float = 0.03
    vote: float = 0.015
    seq_gain: float = 0.1  # Self-MoA-Seq: like one fusion layer, scaled by windows used
    temp_opt: float = 0.7  # sampling temperature that balances diversity and accuracy
    temp_penalty: float = 0.05  # per squared unit of distance from temp_opt
    tokens_per_call: int = 300

    @classmethod
    def random(cls, models: list[str], seed: int) -> "Landscape":
        """A seeded random landscape for the efficiency benchmark (different optimum per seed)."""
        r = random.Random(seed)
        return cls(
            model_scores={m: round(r.uniform(0.3, 0.8), 3) for m in models},
            diversity=r.uniform(0.0, 0.08),
            sampling=r.uniform(0.0, 0.04),
            fuse_gain=r.uniform(0.04, 0.2),
            fuse_decay=r.uniform(0.1, 0.7),
            critic=r.uniform(-0.1, 0.4),
            ranker=r.uniform(-0.1, 0.4),
            sweet_inputs=r.randint(4, 16),
            overload=r.uniform(0.0, 0.03),
            verifier=r.uniform(-0.02, 0.04),
            unit_test=r.uniform(-0.02, 0.05),
            vote=r.uniform(-0.02, 0.04),
            seq_gain=r.uniform(0.0, 0.15),
            temp_opt=r.choice([0.4, 0.7, 1.0]),
            temp_penalty=r.uniform(0.0, 0.1),
        )

    def quality(self, spec: ArchitectureSpec) -> float:
        """Deterministic expected score in [0, 1] of an architecture."""
        s = self.model_scores
        flow = candidate_flow(spec)
        weighted: list[tuple[float, int]] = []
        q = 0.0
        fusion_index = 0
        boost = 0.0
        for i, layer in enumerate(spec.layers):
            for c in layer:
                if isinstance(c, GeneratorSpec):
                    weighted += [(s.get(m, 0.0), c.samples) for m in c.models_used()]
                elif isinstance(c, SelfMoASeqSpec):
                    windows = max(1, -(-max(c.samples - c.window, 0) // (c.window - c.repeat_best)) + 1)
                    q = s.get(c.proposer or c.model or "", 0.0) + self.seq_gain * math.log2(1 + windows) * s.get(c.model or "", 0.0)
            if i == 0 and weighted:
                total = sum(n for _, n in weighted)
                q = sum(sc * n for sc, n in weighted) / total
                q += self.diversity * math.log(len({x for x, _ in weighted}))
                q += self.sampling * math.log2(total)
            if any(isinstance(c, CriticSpec) for c in layer):
                boost += self.critic
            if any(isinstance(c, RankerSpec) for c in layer):
                boost += self.ranker
            fusers = [c for c in layer if isinstance(c, FuserSpec)]
            if fusers:
                fscore = max(s.get(c.model or "", 0.0) for c in fusers)
                gain = self.fuse_gain * fscore * (self.fuse_decay**fusion_index) * (1.0 + boost)
                gain += 0.005 * math.log(len(fusers))  # several fusers give the next layer a little diversity
                q += gain - self.overload * max(0, flow[i] - self.sweet_inputs)
                fusion_index += 1
                boost = 0.0
            if any(isinstance(c, VerifierSpec) for c in layer):
                q += self.verifier
            if any(isinstance(c, UnitTestEvaluatorSpec) for c in layer):
                q += self.unit_test
            if any(isinstance(c, VoteSpec) for c in layer):
                q += self.vote
        temps = []
        for c in spec.layers[0]:
            t = c.proposer_temperature if isinstance(c, SelfMoASeqSpec) else getattr(c, "temperature", None)
            if t is not None:
                temps.append(t)
        if temps:
            q -= self.temp_penalty * (sum(temps) / len(temps) - self.temp_opt) ** 2
        if fusion_index == 0 and boost > 0:
            q += 0.02 * boost  # a lone ranker picks a better candidate, a little
        return min(1.0, max(0.0, q))

    def calls(self, spec: ArchitectureSpec) -> int:
        return spec.backend_calls_estimate()


class ScriptedEvaluator:
    """Evaluator whose per-question score is the landscape's quality plus seeded noise.

    Question evaluations are memoised per (architecture, split, question) like the
    bench cache memoises backend calls; ``evaluations`` counts new ones, which is what
    the efficiency benchmark and the cheap-first tests measure.  ``step_sleep_s``
    makes each new question slow (kill-mid-trial tests).
    """

    def __init__(self, landscape: Landscape, n_dev: int = 40, n_test: int = 160, noise: float = 0.0,
                 step_sleep_s: float = 0.0, seed: int = 0):
        self.landscape = landscape
        self.sizes = {"dev": n_dev, "test": n_test}
        self.noise = noise
        self.step_sleep_s = step_sleep_s
        self.seed = seed
        self._seen: set[tuple[str, str, int]] = set()
        self.evaluations = 0  # new question evaluations
        self.architectures: set[str] = set()  # distinct architectures evaluated at least once

    def split_size(self, split: str) -> int:
        return self.sizes[split]

    def _question_score(self, key: str, q: float, split: str, i: int) -> float:
        if not self.noise:
            return q
        h = int(hashlib.sha1(f"{self.seed}:{key}:{split}:{i}".encode()).hexdigest()[:12], 16)
        return min(1.0, max(0.0, q + random.Random(h).gauss(0.0, self.noise)))

    async def evaluate(self, spec: ArchitectureSpec, split: str, limit: int | None = None,
                       on_step: StepCallback | None = None) -> EvalResult:
        n = min(limit or self.sizes[split], self.sizes[split])
        key = architecture_key(spec)
        self.architectures.add(key)
        q = self.landscape.quality(spec)
        calls = self.landscape.calls(spec)
        scores = []
        for i in range(n):
            if (key, split, i) not in self._seen:
                self._seen.add((key, split, i))
                self.evaluations += 1
                if self.step_sleep_s:
                    await asyncio.sleep(self.step_sleep_s)
            scores.append(self._question_score(key, q, split, i))
            if on_step:
                on_step(i + 1, n)
        return EvalResult(
            score=sum(scores) / n,
            n=n,
            calls=calls * n,
            tokens=calls * n * self.landscape.tokens_per_call,
            per_question=scores,
            ids=[f"{split}-{i}" for i in range(n)],
        )
