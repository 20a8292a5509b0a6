"""Per-system flags a sound harness prints instead of believing a score (issue #17 item 2)."""

from __future__ import annotations

import json

import pytest

from archon_server.bench import alpaca_eval as ae
from archon_server.bench import report as rp


def test_extreme_change_rule_is_upstreams():
    # upstream's docstring examples (rel_diff=4, abs_diff=10): from 20, below 10 or above 40; from 50, outside [37.5, 62.5]
    assert ae.get_is_extreme_changes(20, 9.9) and not ae.get_is_extreme_changes(20, 10.1)
    assert ae.get_is_extreme_changes(20, 40.1) and not ae.get_is_extreme_changes(20, 39.9)
    assert ae.get_is_extreme_changes(50, 37.4) and ae.get_is_extreme_changes(50, 62.6) and not ae.get_is_extreme_changes(50, 60)
    assert ae.lc_change_flags(9.18, 24.2) == [] and ae.lc_change_flags(2.0, 40.0)


def test_output_flags_catch_a_null_model_not_a_real_one():
    null = ae.output_flags(["I'm sorry, but I can't help with that."] * 50)
    assert null["distinct_ratio"] == 0.02 and len(null["flags"]) == 2
    real = ae.output_flags([f"answer {i} " + "word " * (i % 17) for i in range(50)])
    assert real["flags"] == [] and real["distinct_ratio"] == 1.0


def test_position_bias_from_swapped_pairs():
    # a judge that always prefers whatever it saw first: the system wins exactly when it was shown first
    swapped = [i % 2 == 0 for i in range(100)]
    prefs = [2.0 if s else 1.0 for s in swapped]
    pb = ae.position_bias(prefs, swapped)
    assert pb["position_bias"] == pytest.approx(100.0) and pb["flags"]
    fair = ae.position_bias([1.7 if i % 3 else 1.2 for i in range(100)], swapped)
    assert not fair["flags"] and abs(fair["position_bias"]) < 10


def _alpaca_recs(arch: str, outputs: list[str], prefs: list[float], swapped: list[bool]) -> list[dict]:
    return [{"arch": arch, "benchmark": "alpaca_eval", "id": str(i), "output": o, "preference": p, "swapped": s,
             "score": p - 1, "instruction": f"q{i}", "len_baseline": 100, "len_model": len(o)}
            for i, (o, p, s) in enumerate(zip(outputs, prefs, swapped))]


def test_flags_reach_report_md_and_summary_json(tmp_path):
    n = 40
    swapped = [i % 2 == 0 for i in range(n)]
    recs = _alpaca_recs("null-model", ["Sure."] * n, [2.0 if s else 1.0 for s in swapped], swapped)
    recs += _alpaca_recs("honest", [f"a distinct answer {i} " + "x" * (i * 7) for i in range(n)], [1.4 + 0.01 * i for i in range(n)], swapped)
    with open(tmp_path / "results.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    rp.write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Flags" in md
    flag_lines = [ln for ln in md.splitlines() if ln.startswith("- **")]
    assert len(flag_lines) == 1 and "null-model / alpaca_eval" in flag_lines[0]
    assert "near-constant outputs: 2% distinct" in flag_lines[0] and "judge position bias: +100.0" in flag_lines[0]
    summary = {r["arch"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert summary["honest"]["flags"] == [] and len(summary["null-model"]["flags"]) == 3
    assert summary["null-model"]["notes"]["distinct_ratio"] == 0.025


def test_unparsed_verdicts_are_left_out_and_flagged_alike():
    """An AlpacaEval verdict the judge did not give is no draw: left out of the win rate and flagged, as MT-Bench's
    unparsed ratings and Arena-Hard's games without a verdict (all of them flagged in the report's Flags)."""
    recs = _alpaca_recs("s", [f"answer {i}" for i in range(6)], [2.0, 2.0, 1.0, 1.5, 1.5, 1.5], [False] * 6)
    for r in recs[3:]:
        r["judge_method"] = "unparsed"
    for r in recs[:3]:
        r["judge_method"] = "logprobs"
    [row] = rp.aggregate(recs)
    assert row.score == pytest.approx(100 * 2 / 3) and row.n == 6
    assert any("3 of 6 judge verdicts unparsed" in f for f in row.flags)
    [none] = rp.aggregate([{**r, "judge_method": "unparsed"} for r in recs])
    assert none.score is None and any("6 of 6" in f for f in none.flags)
    mt = [{"arch": "s", "benchmark": "mt_bench", "id": str(i), "output": [f"a{i}", f"b{i}"], "turn_scores": [7.0, None]}
          for i in range(2)]
    [mrow] = rp.aggregate(mt)
    assert mrow.score == 7.0 and any("2 of 4 turn ratings unparsed" in f for f in mrow.flags)
    ah = [{"arch": "s", "benchmark": "arena_hard", "id": "q", "output": "x",
           "games": [{"model_first": False, "verdict": None}, {"model_first": True, "verdict": "A>B"}]}]
    [arow] = rp.aggregate(ah)
    assert arow.score == 100.0 and any("1 of 2 games without a verdict" in f for f in arow.flags)


def test_the_report_says_why_lc_is_missing():
    recs = _alpaca_recs("s", [f"answer {i}" for i in range(5)], [1.7] * 5, [False] * 5)
    [row] = rp.aggregate(recs)
    assert "lc_win_rate" not in row.notes and row.notes["lc_missing"] == f"needs >= {rp.LC_MIN_ROWS} judged instructions, has 5"
    assert "lc_missing=needs >= 100 judged instructions, has 5" in rp.markdown([row])


@pytest.mark.parametrize("bench", ["math500", "humaneval", "mmlu"])
def test_an_auto_graded_row_whose_questions_failed_is_flagged_not_reported_as_zero(tmp_path, bench):
    """A dead backend: every question failed, so the row has no score ("–", not 0.00) and its flags say so, by the
    rule the MMLU logprob rows follow (report.failure_flag); some failed: counted as wrong, and flagged."""
    import asyncio
    import sys
    from pathlib import Path

    from archon_server.bench import sweep as sw

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_fakes import ScriptedUpstream, make_registry

    class Dead(ScriptedUpstream):
        def __init__(self, alive: int = 0):
            super().__init__()
            self.alive = alive

        async def chat(self, request):
            if self.calls >= self.alive:
                raise ConnectionError("backend down")
            return await super().chat(request)

    spec = sw.SweepSpec.model_validate({"name": "dead", "architectures": ["scripted"], "concurrency": 1,
                                        "benchmarks": [{"name": bench, "n": 4}]})
    log = asyncio.run(sw.run_sweep(spec, tmp_path / "all", registry=make_registry(Dead()), progress=False))
    [row] = rp.aggregate(log.records)
    assert row.score is None and row.se is None and row.errors == 4
    assert row.flags and row.flags[0].startswith("4 of 4 questions failed: counted as wrong") and "backend down" in row.flags[0]
    md = rp.markdown([row])
    assert f"| scripted | {bench} | 4 | – |" in md and f"**scripted / {bench}**: 4 of 4 questions failed" in md

    log = asyncio.run(sw.run_sweep(spec, tmp_path / "some", registry=make_registry(Dead(alive=1)), progress=False))
    [row] = rp.aggregate(log.records)
    assert row.score is not None and row.errors == 3 and row.flags[0].startswith("3 of 4 questions failed: counted as wrong")
