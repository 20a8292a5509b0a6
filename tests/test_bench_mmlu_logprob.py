"""MMLU logprob mode (lm-evaluation-harness style): the highest-log-probability letter, no generation."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from archon_server.backends.base import Backend, ChatRequest, ChatResult, ScoreRequest, ScoreResult, SequenceScore, Usage
from archon_server.bench import datasets as ds
from archon_server.bench import report as rp
from archon_server.bench import sweep as sw

sys.path.insert(0, str(Path(__file__).parent))
from bench_fakes import make_registry  # noqa: E402


class Scorer(Backend):
    """Knows the answers of the even-numbered questions; for the others it prefers 'A'. Never generates."""

    name = "scorer"
    supports_scoring = True

    def __init__(self):
        self.answers = {it.turns[0]: (k, it.reference) for k, it in enumerate(ds.load_mmlu(subjects=["anatomy"]))}
        self.requests: list[ScoreRequest] = []

    async def chat(self, request: ChatRequest) -> ChatResult:
        raise AssertionError("logprob mode must not generate")

    async def score(self, request: ScoreRequest) -> ScoreResult:
        self.requests.append(request)
        k, ref = self.answers[request.messages[0]["content"]]
        best = ref if k % 2 == 0 else "A"
        return ScoreResult([SequenceScore(-0.1 if c.strip() == best else -3.0, [], []) for c in request.continuations], Usage(50, 0))


def test_logprob_mode_scores_letters_and_reports_separately(tmp_path):
    up = Scorer()
    spec = sw.SweepSpec.model_validate({
        "name": "lp", "architectures": ["scripted", "null-model"],
        "benchmarks": [{"name": "mmlu", "n": 6, "ids": [f"anatomy/{k}" for k in range(6)], "mode": "logprob"}]})
    log = asyncio.run(sw.run_sweep(spec, tmp_path / "o", registry=make_registry(up), progress=False))
    recs = {(r["arch"], r["id"]): r for r in log.records}
    assert {r["benchmark"] for r in log.records} == {"mmlu_logprob"}
    items = {it.id: it for it in ds.load_mmlu(subjects=["anatomy"])}
    for k in range(6):
        r = recs[("scripted", f"anatomy/{k}")]
        want = items[f"anatomy/{k}"].reference if k % 2 == 0 else "A"
        assert r["extracted"] == want and r["correct"] == (want == items[f"anatomy/{k}"].reference)
        assert set(r["grade"]["logprobs"]) == set("ABCD")
    # the letters continue an assistant turn that says "Answer:", as lm-eval's " A".." continuations
    assert up.requests[0].messages[-1] == {"role": "assistant", "content": "Answer:"} and up.requests[0].continuations == [" A", " B", " C", " D"]
    assert all("error" in recs[("null-model", f"anatomy/{k}")] for k in range(6))  # no model, no log-probabilities
    rows = {r.arch: r for r in rp.aggregate(log.records)}
    assert rows["scripted"].benchmark == "mmlu_logprob" and rows["scripted"].score >= 50.0


class ChatAndScore(Scorer):
    """Generates as the scripted upstream (MATH for the ensembles) and scores MMLU's letters as :class:`Scorer`."""

    def __init__(self):
        super().__init__()
        from bench_fakes import ScriptedUpstream

        self.chatter = ScriptedUpstream()

    async def chat(self, request: ChatRequest) -> ChatResult:
        return await self.chatter.chat(request)


def test_a_logprob_benchmark_beside_ensembles_skips_only_their_logprob_pairs(tmp_path):
    """One model on MMLU logprob beside ensembles on MATH: the sweep runs; each pair that cannot be scored (the
    ensemble, null-model on mmlu_logprob) is recorded as skipped with the reason, makes no call, and the report says so."""
    (tmp_path / "tiny-moa.yaml").write_text("name: tiny-moa\nlayers:\n  - - {type: generator, models: [proposer-1, proposer-2]}\n"
                                            "  - - {type: fuser, model: aggregator}\n")
    up = ChatAndScore()
    spec = sw.SweepSpec.model_validate({
        "name": "mix", "architectures": ["scripted", str(tmp_path / "tiny-moa.yaml"), "null-model"],
        "benchmarks": [{"name": "math500", "n": 2}, {"name": "mmlu", "n": 2, "ids": ["anatomy/0", "anatomy/1"], "mode": "logprob"}]})
    log = asyncio.run(sw.run_sweep(spec, tmp_path / "o", registry=make_registry(up), progress=False))
    recs = {(r["arch"], r["benchmark"], r["id"]): r for r in log.records}
    assert len(recs) == 3 * 4
    assert all(not recs[("tiny-moa", "math500", i)].get("error") for _, b, i in recs if b == "math500")
    assert all("grade" in recs[("scripted", "mmlu_logprob", f"anatomy/{k}")] for k in range(2))
    assert len(up.requests) == 2  # only the single model's letters were scored
    for arch in ("tiny-moa", "null-model"):
        for k in range(2):
            r = recs[(arch, "mmlu_logprob", f"anatomy/{k}")]
            assert r["skipped"] == sw.LOGPROB_SKIP and r["error"] == f"skipped: {sw.LOGPROB_SKIP}" and r["calls"] == 0
    rows = {(r.arch, r.benchmark): r for r in rp.aggregate(log.records)}
    skipped = rows[("tiny-moa", "mmlu_logprob")]
    assert skipped.score is None and skipped.errors == 0 and skipped.notes["skipped"] == 2
    assert skipped.flags == [f"2 of 2 questions skipped (not run, not scored): {sw.LOGPROB_SKIP}"]
    assert rows[("scripted", "mmlu_logprob")].flags == [] and rows[("scripted", "mmlu_logprob")].score is not None
    md = rp.markdown(list(rows.values()))
    assert "**tiny-moa / mmlu_logprob**: 2 of 2 questions skipped" in md and "**null-model / mmlu_logprob**" in md


class FailingScorer(Scorer):
    """Its scoring call fails for the questions in ``fail`` (every one by default): a backend without prompt
    log-probabilities, a timeout."""

    def __init__(self, fail=None):
        super().__init__()
        self.fail = fail

    async def score(self, request: ScoreRequest) -> ScoreResult:
        k, _ = self.answers[request.messages[0]["content"]]
        if self.fail is None or k in self.fail:
            raise RuntimeError("prompt logprobs unavailable")
        return await super().score(request)


def test_failed_scoring_calls_are_flagged_not_reported_as_zero(tmp_path):
    """Every scoring call failed: the row has no score ("–", not 0.00) and its flags say why; some failed: left out
    of the accuracy and counted in the flags."""
    ids = [f"anatomy/{k}" for k in range(4)]
    bench = [{"name": "mmlu", "n": 4, "ids": ids, "mode": "logprob"}]
    spec = sw.SweepSpec.model_validate({"name": "lp", "architectures": ["scripted"], "benchmarks": bench})
    log = asyncio.run(sw.run_sweep(spec, tmp_path / "all", registry=make_registry(FailingScorer()), progress=False))
    [row] = rp.aggregate(log.records)
    assert row.score is None and row.errors == 4
    assert row.flags and row.flags[0].startswith("4 of 4 scoring calls failed: left out of the accuracy") and "prompt logprobs" in row.flags[0]
    md = rp.markdown([row])
    assert "| scripted | mmlu_logprob | 4 | – |" in md and "**scripted / mmlu_logprob**: 4 of 4 scoring calls failed" in md
    log = asyncio.run(sw.run_sweep(spec, tmp_path / "some", registry=make_registry(FailingScorer(fail={1, 3})), progress=False))
    [row] = rp.aggregate(log.records)
    assert row.score == 100.0 and row.flags[0].startswith("2 of 4 scoring calls failed")  # 0 and 2: known, right
