"""`archon bench ...` on bad input: one line naming the file and field, exit 2, nothing created; Ctrl-C during a
run: one line, exit 130, and the run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from archon_server.cli import main
from archon_server.config import PRESET_ALIASES
from archon_server.testing.upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[1]


def _server(tmp_path: Path, url: str) -> Path:
    p = tmp_path / "server.json"
    p.write_text(json.dumps({"backends": [{"alias": "fake", "kind": "openai", "model": "fake-model", "urls": [url],
                                           "aliases": PRESET_ALIASES, "max_retries": 0}]}))
    return p


def _err(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("body, where", [
    ("architectures: [fake]\nbenchmarks: [{name: math5000, n: 2}]\n", "benchmarks[0]: unknown benchmark 'math5000'"),
    ("architectures: [fake]\nbenchmarks:\n  - {name: math500, n: 2}\n  bad: [\n", "line 4"),
    ("architectures: [nope-arch]\nbenchmarks: [{name: math500, n: 2}]\n", "architectures: 'nope-arch'"),
    ("judge: jduge\narchitectures: [fake]\nbenchmarks: [{name: alpaca_eval, n: 2}]\n", "judge: 'jduge' is not a backend alias"),
    ("architectures: [fake]\nbenchmarks: [{name: mt_bench, n: 2}]\n", "judge: the judged benchmarks (mt_bench) need a judge"),
    # out-of-range params are refused when the sweep is read, not by every question's call
    ("params: {max_tokens: -5}\narchitectures: [fake]\nbenchmarks: [{name: math500, n: 2}]\n", "params.max_tokens: "),
    ("params: {max_tokens: 0}\narchitectures: [fake]\nbenchmarks: [{name: math500, n: 2}]\n", "params.max_tokens: "),
    ("params: {temperature: -0.1}\narchitectures: [fake]\nbenchmarks: [{name: math500, n: 2}]\n", "params.temperature: "),
    # the API's bounds (archon_server.sampling_fields): temperature at most 2, as a request's 400 says
    ("params: {temperature: 3}\narchitectures: [fake]\nbenchmarks: [{name: math500, n: 2}]\n",
     "params.temperature: Input should be less than or equal to 2"),
    ("params: {stop: [a, b, c, d, e]}\narchitectures: [fake]\nbenchmarks: [{name: math500, n: 2}]\n",
     "params.stop: at most 4 stop sequences"),
    ("params: {top_p: 0}\narchitectures: [fake]\nbenchmarks: [{name: math500, n: 2}]\n", "params.top_p: "),
    ("params: {top_p: 1.5}\narchitectures: [fake]\nbenchmarks: [{name: math500, n: 2}]\n", "params.top_p: "),
    ("params: {n: 0}\narchitectures: [fake]\nbenchmarks: [{name: math500, n: 2}]\n", "params.n: "),
    ("params: {max_token: 8}\narchitectures: [fake]\nbenchmarks: [{name: math500, n: 2}]\n", "params.max_token: "),
])
def test_bad_sweep_is_one_line_naming_file_and_field(tmp_path, capsys, body, where):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(body)
    cfg = _server(tmp_path, "http://127.0.0.1:9/v1")  # never called: the sweep is refused before any call
    rc = main(["bench", "run", str(sweep), "--config", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"])
    err = _err(capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"{sweep}: ") and where in err[0], err
    assert not (tmp_path / "out").exists()


def test_missing_sweep_file_and_data_folder(tmp_path, capsys):
    assert main(["bench", "run", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "out")]) == 2
    [line] = _err(capsys)
    assert line.startswith(f"{tmp_path / 'none.yaml'}: ") and "No such file" in line
    sweep = tmp_path / "s.yaml"
    sweep.write_text("architectures: [fake]\nbenchmarks: [{name: math500, n: 2}]\n")
    assert main(["bench", "run", str(sweep), "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "out")]) == 2
    [line] = _err(capsys)
    assert line.startswith("--data: ") and str(tmp_path / "nodata") in line
    assert not (tmp_path / "out").exists()


def test_report_refuses_what_it_cannot_report(tmp_path, capsys):
    missing = tmp_path / "nonexist"
    assert main(["bench", "report", str(missing)]) == 2
    assert "no such folder" in _err(capsys)[0] and not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["bench", "report", str(empty), "--store", store]) == 2
    assert "pass --sweep" in _err(capsys)[0]
    assert main(["bench", "report", str(empty), "--store", store, "--sweep", "typo"]) == 2
    assert "no sweep 'typo'" in _err(capsys)[0]
    assert list(empty.iterdir()) == []  # no empty report written


def test_report_needs_the_data_folder_only_for_alpaca_eval(tmp_path, capsys):
    """A machine that only reaches the store (no benchmark data) reports a sweep without AlpacaEval; one with
    AlpacaEval results needs the data (its export carries the instructions): one line, exit 2."""
    from archon_server.bench.store import SweepStore

    store, nodata = f"sqlite:///{tmp_path / 'store.db'}", str(tmp_path / "nodata")
    s = SweepStore(store, "s")
    try:
        s.results.register({"name": "s"})
        for qid in ("1", "2"):
            assert s.results.claim_sync("a", "math500", qid)
            s.results.append_sync({"arch": "a", "benchmark": "math500", "id": qid, "score": 1.0, "correct": True, "calls": 1})
    finally:
        s.close()
    out = tmp_path / "out"
    assert main(["bench", "report", str(out), "--store", store, "--sweep", "s", "--data", nodata]) == 0
    assert "| a | math500 | 2 | 100.00 |" in (out / "report.md").read_text()
    capsys.readouterr()
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({"arch": "a", "benchmark": "alpaca_eval", "id": "0", "score": 0.0, "preference": 1.0}) + "\n")
    (out / "report.md").unlink()
    assert main(["bench", "report", str(out), "--data", nodata]) == 2
    [line] = _err(capsys)
    assert line.startswith("--data: ") and nodata in line and "AlpacaEval" in line, line
    assert not (out / "report.md").exists()


def test_score_alpaca_refuses_model_outputs(tmp_path, capsys):
    from archon_server.bench.paths import data_dir

    outputs = data_dir() / "alpaca_eval" / "model_outputs" / "gpt4_1106_preview.json"
    assert main(["bench", "score-alpaca", str(outputs)]) == 2
    [line] = _err(capsys)
    assert str(outputs) in line and "output_1" in line and "preference" in line


def test_ctrl_c_is_one_line_and_resumes(tmp_path):
    up = FakeUpstream(latency=0.2).start()
    try:
        cfg = _server(tmp_path, up.url)
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({
            "name": "int", "concurrency": 2, "architectures": ["fake"], "benchmarks": [{"name": "math500", "n": 40}]}))
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "archon_server", "bench", "run", str(tmp_path / "s.yaml"), "--config", str(cfg),
               "--out", str(out), "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        # a shell's background job ignores SIGINT; a terminal's Ctrl-C reaches a process that does not
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        results = out / "results.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (results.exists() and results.read_text().count("\n") >= 2):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 130, err
        assert len(lines) == 1 and lines[0].startswith("interrupted: "), err
        saved = len(results.read_text().splitlines())
        assert f"{saved} results saved in {out}" in lines[0] and 2 <= saved < 40
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
        assert runs[-1]["records_before"] == saved and runs[-1]["records_after"] == 40
    finally:
        up.stop()


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_a_limit_below_one_is_refused_in_one_line(tmp_path, capsys, limit):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("architectures: [fake]\nbenchmarks: [{name: math500, n: 2}]\n")
    cfg = _server(tmp_path, "http://127.0.0.1:9/v1")
    assert main(["bench", "run", str(sweep), "--config", str(cfg), "--limit", limit, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    [line] = _err(capsys)
    assert line.startswith(f"--limit {limit}: must be 1 or more"), line
    assert not (tmp_path / "out").exists()


def test_resuming_with_another_limit_is_one_line_naming_the_limit_to_pass(tmp_path, capsys):
    """Not the whole benchmarks list of both definitions: the --limit given and the one the results were made with."""
    up = FakeUpstream().start()
    try:
        cfg = _server(tmp_path, up.url)
        sweep = tmp_path / "s.yaml"
        sweep.write_text("architectures: [fake]\nbenchmarks: [{name: math500, n: 3}, {name: mmlu}, {name: humaneval, n: 1}]\n")
        out = tmp_path / "out"
        run = ["bench", "run", str(sweep), "--config", str(cfg), "--out", str(out), "--no-progress"]
        assert main(run + ["--limit", "2"]) == 0
        capsys.readouterr()
        for again, given in ((["--limit", "1"], "--limit 1"), ([], "no --limit")):
            assert main(run + again) == 2
            [line] = _err(capsys)
            assert line.startswith(f"{sweep}: {given}: {out} holds 5 results made with --limit 2 ("), line
            assert line.endswith("resume with --limit 2, or use another --out") and '"name"' not in line, line
        assert main(run + ["--limit", "2"]) == 0  # the same limit resumes
    finally:
        up.stop()


@pytest.mark.parametrize("sweep_body, extra, want", [
    ("architectures: [fake]\n", ["--config", "nothere.json"], "--config: nothere.json: no such file"),
    ("config: srv.yaml\narchitectures: [fake]\n", [], "{sweep}: config: srv.yaml: no such file"),
    ("architectures: [archs/mine.yaml]\n", ["--config", "{cfg}"], "{sweep}: architectures: archs/mine.yaml: no such file"),
])
def test_a_missing_file_a_sweep_names_is_named_as_given(tmp_path, capsys, monkeypatch, sweep_body, extra, want):
    """Not the sweep folder's fallback path (`proj/nothere.json`): the path the user wrote, and where it was looked for."""
    proj = tmp_path / "proj"
    (proj / "benchmarks").mkdir(parents=True)
    sweep = proj / "benchmarks" / "s.yaml"
    sweep.write_text(sweep_body + "benchmarks: [{name: math500, n: 2}]\n")
    cfg = _server(tmp_path, "http://127.0.0.1:9/v1")
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "run", str(sweep), *[x.format(cfg=cfg) for x in extra], "--out", str(tmp_path / "out"), "--no-progress"])
    [line] = _err(capsys)
    assert rc == 2 and line.startswith(want.format(sweep=sweep)), line
    # the places in the order they are tried (graph.catalog.find_file, as Catalog.resolve loads a file): the sweep's
    # project folder, then the working directory
    assert line.endswith(f"(looked in {proj}, then in the working directory)"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    # --max-tokens alone: the generator keeps its own temperature and top_p (not SamplingParams' 0.7 and 1.0)
    (["--max-tokens", "40"], (40, 0.2, 0.5)),
    # nothing given: everything is the architecture's own (max_tokens 100, not 512; it was so only without --max-tokens)
    ([], (100, 0.2, 0.5)),
    (["--temperature", "0"], (100, 0.0, 0.5)),
])
def test_archon_run_passes_only_the_parameters_given_on_its_command_line(tmp_path, capsys, flags, expected):
    """`archon run` as a sweep's params (SweepParams.final): the fields the user gave, the rest the architecture's."""
    up = FakeUpstream().start()
    try:
        cfg = _server(tmp_path, up.url)
        arch = tmp_path / "cool.yaml"
        arch.write_text("name: cool\nlayers:\n  - - {type: generator, model: fake, max_tokens: 100, temperature: 0.2, top_p: 0.5}\n")
        assert main(["run", "Hi", "-a", str(arch), "-c", str(cfg), *flags]) == 0
    finally:
        up.stop()
    [req] = up.requests
    assert (req.body.get("max_tokens"), req.body.get("temperature"), req.body.get("top_p")) == expected, req.body
    assert "answer 0" in capsys.readouterr().out


def test_archon_run_refuses_a_parameter_out_of_range_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "Hi", "-c", str(_server(tmp_path, "http://127.0.0.1:9/v1")), "--max-tokens", "0"])
    assert e.value.code == 2
    [line] = _err(capsys)
    assert line.startswith("error: --max-tokens: ") and "greater than or equal to 1" in line, line


def test_archon_run_refuses_a_temperature_the_api_refuses(tmp_path, capsys):
    """`archon run` checks its flags with a sweep's params, whose bounds are the API's (sampling_fields): at most 2."""
    with pytest.raises(SystemExit) as e:
        main(["run", "Hi", "-c", str(_server(tmp_path, "http://127.0.0.1:9/v1")), "--temperature", "3"])
    assert e.value.code == 2
    [line] = _err(capsys)
    assert line == "error: --temperature: Input should be less than or equal to 2", line
