"""pass@k: the unbiased estimator (Codex paper) and a sweep that samples n answers per problem."""

from __future__ import annotations

import asyncio
import math
import sys
from collections import Counter
from pathlib import Path

import pytest

from archon_server.backends.base import Backend, ChatRequest, ChatResult, Choice, Usage
from archon_server.bench import datasets as ds
from archon_server.bench import report as rp
from archon_server.bench import sweep as sw
from archon_server.bench.grading import pass_at_k
from archon_server.spec import SpecError

sys.path.insert(0, str(Path(__file__).parent))
from bench_fakes import make_registry


def test_pass_at_k_matches_the_combinatorial_definition():
    for n in (1, 5, 10, 20):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 200, 1) == 1.0
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 10)


class HalfRight(Backend):
    """Answers the i-th request for a HumanEval prompt with the canonical solution when i < correct[prompt]."""

    name = "half"

    def __init__(self, correct: dict[str, int]):
        self.correct = correct
        self.seen: Counter[str] = Counter()
        self.by_prompt = {it.turns[0]: it for it in ds.load("humaneval")}

    async def chat(self, request: ChatRequest) -> ChatResult:
        it = self.by_prompt[request.messages[-1]["content"]]
        i = self.seen[it.id]
        self.seen[it.id] += 1
        body = it.reference["canonical_solution"] if i < self.correct[it.id] else "    return None\n"
        return ChatResult([Choice(f"```python\n{it.reference['prompt']}{body}```")], Usage(10, 10), request.model)


def test_sweep_samples_n_answers_and_reports_pass_at_k(tmp_path):
    items = ds.subset(ds.load("humaneval"), n=3, seed=0)
    correct = {items[0].id: 0, items[1].id: 2, items[2].id: 5}
    up = HalfRight(correct)
    spec = sw.SweepSpec.model_validate({
        "name": "pk", "concurrency": 3, "architectures": ["scripted"], "params": {"temperature": 0.8, "seed": 1},
        "benchmarks": [{"name": "humaneval", "n": 3, "pass_at": {"n": 5, "k": [1, 2]}}]})
    log = asyncio.run(sw.run_sweep(spec, tmp_path / "out", registry=make_registry(up), progress=False))
    assert dict(up.seen) == {i: 5 for i in correct}  # five samples per problem, none served from one cache entry
    recs = {r["id"]: r for r in log.records}
    for qid, c in correct.items():
        assert recs[qid]["n_correct"] == c and len(recs[qid]["samples"]) == 5
        assert set(recs[qid]["pass_at"]) == {"1", "2"}
    row = rp.aggregate(log.records)[0]
    want1 = 100 * sum(pass_at_k(5, c, 1) for c in correct.values()) / 3
    want2 = 100 * sum(pass_at_k(5, c, 2) for c in correct.values()) / 3
    assert row.notes["pass@1"] == pytest.approx(want1, abs=0.01) and row.notes["pass@2"] == pytest.approx(want2, abs=0.01)
    assert row.score == pytest.approx(want1)


def test_pass_at_validation(tmp_path):
    # a k beyond n has no estimate: refused naming the field, not dropped from the report
    bad = tmp_path / "bad.yaml"
    bad.write_text("architectures: [a]\nbenchmarks: [{name: humaneval, pass_at: {n: 3, k: [1, 2, 5]}}]\n")
    with pytest.raises(SpecError) as e:
        sw.load_sweep(bad)
    assert e.value.source == str(bad) and any("benchmarks[0].pass_at" in m and "[5]" in m for m in e.value.errors)
    # k left out: those of 1, 10, 100 within n
    ok = sw.SweepSpec.model_validate({"architectures": ["a"], "benchmarks": [{"name": "humaneval", "pass_at": {"n": 20}}]})
    assert ok.benchmarks[0].pass_at.k == [1, 10]
    bad.write_text("architectures: [a]\njudge: judge\nbenchmarks: [{name: mt_bench, n: 1, pass_at: {n: 2}}]\n")
    with pytest.raises(SpecError) as e:
        sw.load_sweep(bad)
    assert any("benchmarks[0]" in m and "pass_at" in m for m in e.value.errors)


def test_pass_at_keeps_one_trace_per_sample(tmp_path):
    items = ds.subset(ds.load("humaneval"), n=1, seed=0)
    spec = sw.SweepSpec.model_validate({
        "name": "pkt", "architectures": ["scripted"], "keep_traces": True, "params": {"temperature": 0.8, "seed": 1},
        "benchmarks": [{"name": "humaneval", "ids": [items[0].id], "pass_at": {"n": 3, "k": [1]}}]})
    log = asyncio.run(sw.run_sweep(spec, tmp_path / "out", registry=make_registry(HalfRight({items[0].id: 1})), progress=False))
    [rec] = log.records
    assert len(rec["traces"]) == 3 and all(t["calls"] == 1 for t in rec["traces"])
