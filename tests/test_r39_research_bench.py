"""A researcher's walk through README's `archon bench` section (round 39): what it found.

* ``summary.json`` of a sweep with one judged AlpacaEval instruction held a bare ``NaN`` (its standard error), which
  is no JSON: strict parsers (JavaScript's JSON.parse, Go, serde) refuse the file; now ``null``, as the other rows'.
* ``backend_concurrency: {default: -1}`` crashed with asyncio's traceback (after creating the output folder); a key
  that is an alias but not the backend's own name (``judge``), or a misspelt one, capped nothing, silently.
* An architecture whose model aliases the server config lacks (``moa-lite`` needs ``proposer-4..6``) was not refused
  before the first call, as README says a sweep is checked: every question of it failed and was recorded as failed.
* A re-run of a finished sweep drew two empty bars and never said that it resumed.
* `archon bench list --data MISSING` listed every benchmark as unavailable, exit 0; now one line, exit 2, as `run`.
* Arena-Hard with no game the judge gave a label (the 135M judge of `seven.yaml`): `ci95=(nan, nan)` in the notes.
* A sweep that asks a question twice (overlapping entries) or lists an architecture twice ran it twice and counted it
  once (n=2 reported for 3 questions asked), or dropped one of two architectures of the same name; now refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from archon_server.cli import main
from archon_server.testing.upstream import FakeUpstream


def _server(tmp_path: Path, url: str, aliases: list[str]) -> Path:
    p = tmp_path / "server.json"
    p.write_text(json.dumps({"backends": [{"alias": "fake", "kind": "openai", "model": "fake-model", "urls": [url],
                                           "aliases": aliases, "max_retries": 0}]}))
    return p


def _err(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]


def _strict(text: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_summary_json_is_strict_json_when_one_instruction_was_judged(tmp_path, capsys):
    """`archon bench report` of a folder with one judged AlpacaEval instruction (a `--limit 1` smoke run)."""
    out = tmp_path / "sweep"
    out.mkdir()
    rec = {"arch": "null-model", "benchmark": "alpaca_eval", "id": "148", "seconds": 0.0,
           "output": "I'm sorry, but I can't help with that.", "calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
           "score": 0.65, "preference": 1.65, "judge_method": "logprobs", "swapped": False, "len_baseline": 5475,
           "len_model": 38, "instruction": "Write me a 2000 word essay on a water safety engineer", "judge_calls": 1}
    (out / "results.jsonl").write_text(json.dumps(rec) + "\n")
    assert main(["bench", "report", str(out)]) == 0
    [row] = _strict((out / "summary.json").read_text())
    assert row["score"] == pytest.approx(65.0) and row["se"] is None, row
    assert "| null-model | alpaca_eval | 1 | 65.00 | – |" in (out / "report.md").read_text()


@pytest.mark.parametrize("caps, where", [
    ("{default: -1}", "backend_concurrency.default: Input should be greater than or equal to 1"),
    ("{judge: 0}", "backend_concurrency.judge: Input should be greater than or equal to 1"),
    ("{jugde: 2}", "backend_concurrency.jugde: not a backend alias of the server config (known: "),
])
def test_a_bad_backend_concurrency_is_one_line_naming_the_key(tmp_path, capsys, caps, where):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"backend_concurrency: {caps}\narchitectures: [fake]\nbenchmarks: [{{name: math500, n: 2}}]\n")
    cfg = _server(tmp_path, "http://127.0.0.1:9/v1", ["default", "judge"])  # never called
    rc = main(["bench", "run", str(sweep), "--config", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"])
    err = _err(capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"{sweep}: ") and where in err[0], err
    assert not (tmp_path / "out").exists()


def _max_in_flight(up: FakeUpstream) -> int:
    events = sorted([(r.started, 1) for r in up.requests] + [(r.ended, -1) for r in up.requests], key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def test_backend_concurrency_caps_the_backend_an_alias_names(tmp_path, capsys):
    """`{judge: 1}` caps the backend `judge` is an alias of (README: per-backend limits); it was ignored unless the key
    was the backend's own name, and 4 questions went to it at once."""
    up = FakeUpstream(latency=0.15).start()
    try:
        cfg = _server(tmp_path, up.url, ["default", "judge"])
        sweep = tmp_path / "s.yaml"
        sweep.write_text(yaml.safe_dump({"name": "cap", "concurrency": 4, "backend_concurrency": {"judge": 1},
                                         "architectures": ["default"], "benchmarks": [{"name": "math500", "n": 4}]}))
        assert main(["bench", "run", str(sweep), "--config", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
        assert len(up.requests) == 4 and all(r.ended is not None for r in up.requests)
        assert _max_in_flight(up) == 1
    finally:
        up.stop()


def test_an_architecture_using_aliases_the_config_lacks_is_refused_before_any_call(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("architectures: [self-moa, moa-lite]\nbenchmarks: [{name: math500, n: 2}]\n")
    cfg = _server(tmp_path, "http://127.0.0.1:9/v1",  # never called
                  ["default", "aggregator", "judge", "proposer-1", "proposer-2", "proposer-3"])
    rc = main(["bench", "run", str(sweep), "--config", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"])
    err = _err(capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"{sweep}: architectures: 'moa-lite' uses model alias(es) the server config lacks: "
                             "proposer-4, proposer-5, proposer-6 (known: "), err
    assert not (tmp_path / "out").exists()


def test_a_rerun_of_a_finished_sweep_says_it_resumes_with_nothing_to_run(tmp_path, capsys):
    up = FakeUpstream().start()
    try:
        cfg = _server(tmp_path, up.url, ["default"])
        sweep = tmp_path / "s.yaml"
        sweep.write_text(yaml.safe_dump({"name": "again", "architectures": ["default"],
                                         "benchmarks": [{"name": "math500", "n": 2}]}))
        args = ["bench", "run", str(sweep), "--config", str(cfg), "--out", str(tmp_path / "out")]
        assert main(args) == 0
        capsys.readouterr()
        calls = len(up.requests)
        assert main(args) == 0
        err = _err(capsys)
        assert len(up.requests) == calls  # nothing asked again
        assert err[0] == "again: resuming, 2 results already saved; nothing to run", err
        assert not any("0q" in line for line in err), err  # no empty bar
    finally:
        up.stop()


def test_bench_list_with_a_missing_data_folder_is_one_line(tmp_path, capsys):
    """It printed `unavailable: benchmark data directory not found` for each of the 11 benchmarks and exit 0."""
    missing = tmp_path / "nodata"
    assert main(["bench", "list", "--data", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"--data: benchmark data directory not found: {missing} "
                                         "(set ARCHON_DATA_DIR or pass a path)"]
    assert not missing.exists()


def test_arena_hard_without_a_verdict_has_no_score_and_no_nan_interval(tmp_path, capsys):
    """`archon bench run benchmarks/seven.yaml --limit 1` on the embedded model: the 135M judge gives no Arena-Hard
    label, and the report's notes read `ci95=(nan, nan)` (summary.json: `"score": NaN`)."""
    out = tmp_path / "sweep"
    out.mkdir()
    rec = {"arch": "default", "benchmark": "arena_hard", "id": "0", "output": "an answer", "calls": 1, "score": None,
           "games": [{"model_first": False, "verdict": None}, {"model_first": True, "verdict": None}], "judge_calls": 2}
    (out / "results.jsonl").write_text(json.dumps(rec) + "\n")
    assert main(["bench", "report", str(out)]) == 0
    [row] = _strict((out / "summary.json").read_text())
    assert row["score"] is None and "ci95" not in row["notes"], row
    assert row["flags"] == ["2 of 2 games without a verdict: left out (as upstream)"], row
    md = (out / "report.md").read_text()
    assert "| default | arena_hard | 1 | – | – | win % |" in md and "nan" not in md, md


@pytest.mark.parametrize("body, where", [
    # {math500, n: 1} draws from the whole benchmark: its question is one of the test split's two
    ("architectures: [default]\nbenchmarks: [{name: math500, n: 1}, {name: math500, split: test, n: 2}]\n",
     "benchmarks[1]: asks math500 questions benchmarks[0] asks too"),
    ("architectures: [default]\nbenchmarks: [{name: humaneval, n: 2}, {name: humaneval, n: 2, pass_at: {n: 2}}]\n",
     "benchmarks[1]: asks humaneval questions benchmarks[0] asks too"),
    ("architectures: [default, default]\nbenchmarks: [{name: math500, n: 2}]\n",
     "architectures[1]: 'default' is listed twice"),
    ("architectures: [null-model, null-model]\nbenchmarks: [{name: math500, n: 2}]\n",
     "architectures[1]: 'null-model' is listed twice"),
    ("architectures: [self-moa, renamed.yaml]\nbenchmarks: [{name: math500, n: 2}]\n",
     "architectures[1]: 'renamed.yaml' is named 'self-moa', as architectures[0] ('self-moa') is"),
])
def test_a_question_or_architecture_a_sweep_repeats_is_refused(tmp_path, capsys, body, where):
    """Results are kept per (architecture name, benchmark, question): a repeat ran twice and was counted once (the
    sweep of two overlapping math500 entries reported n=2 for 3 questions asked), or one of two architectures of the
    same name was dropped."""
    (tmp_path / "renamed.yaml").write_text(
        (Path(__file__).resolve().parents[1] / "architectures" / "self-moa-seq.yaml").read_text()
        .replace("name: self-moa-seq", "name: self-moa"))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(body)
    cfg = _server(tmp_path, "http://127.0.0.1:9/v1", ["default", "aggregator", "proposer-1"])  # never called
    rc = main(["bench", "run", str(sweep), "--config", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"])
    err = _err(capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"{sweep}: {where}"), err
    assert not (tmp_path / "out").exists()
