"""Sweeps end to end on a scripted upstream: caching, resume without duplicates, reports, exports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from archon_server.backends.base import ChatRequest, SamplingParams
from archon_server.bench import cache as bc
from archon_server.bench import report as rp
from archon_server.bench import sweep as sw

sys.path.insert(0, str(Path(__file__).parent))
from bench_fakes import ScriptedUpstream, make_registry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

ARCH = """
name: tiny-moa
layers:
  - - {type: generator, models: [proposer-1, proposer-2]}
  - - {type: fuser, model: aggregator}
"""


def _spec(tmp_path: Path, **kw) -> sw.SweepSpec:
    (tmp_path / "tiny-moa.yaml").write_text(ARCH)
    data = dict(
        name="t", judge="judge", concurrency=4, backend_concurrency={"default": 3},
        architectures=["scripted", str(tmp_path / "tiny-moa.yaml"), "null-model"],
        benchmarks=[{"name": "math500", "split": "dev", "n": 3}, {"name": "alpaca_eval", "n": 3},
                    {"name": "mt_bench", "n": 2}, {"name": "arena_hard", "n": 2}, {"name": "humaneval", "n": 2}],
    )
    data.update(kw)
    return sw.SweepSpec.model_validate(data)


async def test_caching_backend_replays_with_occurrence_index(tmp_path):
    up = ScriptedUpstream()
    store = bc.CacheStore(tmp_path / "c.sqlite")
    cb = bc.CachingBackend(up, store)
    req = ChatRequest("m", [{"role": "user", "content": "hi"}], SamplingParams(temperature=0.7))
    with bc.cache_scope("q1"):
        a = [(await cb.chat(req)).choices[0].text for _ in range(3)]
    assert up.calls == 3  # identical requests within a scope are distinct samples
    with bc.cache_scope("q1"):
        b = [(await cb.chat(req)).choices[0].text for _ in range(3)]
    assert up.calls == 3 and a == b and cb.hits == 3
    other = ChatRequest("m", [{"role": "user", "content": "hi"}], SamplingParams(temperature=0.2))
    with bc.cache_scope("q1"):
        await cb.chat(other)
    assert up.calls == 4  # params are part of the key
    # a fresh store object on the same file sees the entries (persistence)
    store.close()
    cb2 = bc.CachingBackend(up, bc.CacheStore(tmp_path / "c.sqlite"))
    with bc.cache_scope("q1"):
        await cb2.chat(req)
    assert up.calls == 4


async def test_sweep_runs_resumes_and_reports(tmp_path):
    up = ScriptedUpstream()
    spec = _spec(tmp_path)
    log = await sw.run_sweep(spec, tmp_path / "out", registry=make_registry(up), progress=False)
    n_q = 3 + 3 + 2 + 2 + 2
    assert len(log.records) == 3 * n_q
    assert not [r for r in log.records if r.get("error")], [r["error"] for r in log.records if r.get("error")]
    calls_first = up.calls
    assert calls_first > 0
    by = {(r["arch"], r["benchmark"], r["id"]): r for r in log.records}
    some = next(r for r in log.records if r["arch"] == "tiny-moa")
    assert some["calls"] == 3  # two proposers + one fuser
    assert all(r["calls"] == 0 for r in log.records if r["arch"] == "null-model")
    assert all(r["judge_method"] == "logprobs" for r in log.records if r["benchmark"] == "alpaca_eval")
    assert all(r["score"] == 0.0 for r in log.records if r["benchmark"] == "humaneval")  # `pass` bodies fail the tests
    assert len(by) == len(log.records)

    # Re-run: everything done, nothing called again, nothing duplicated.
    up2 = ScriptedUpstream()
    log2 = await sw.run_sweep(spec, tmp_path / "out", registry=make_registry(up2), progress=False)
    assert up2.calls == 0 and len(log2.records) == 3 * n_q
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert runs[0]["cache_misses"] == calls_first and runs[0]["records_after"] == 3 * n_q
    assert runs[1]["cache_misses"] == 0 and runs[1]["records_before"] == runs[1]["records_after"]
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 * n_q

    # Lose the file (but keep the cache): the re-run regenerates every record from the cache alone.
    (tmp_path / "out" / "results.jsonl").unlink()
    up3 = ScriptedUpstream()
    log3 = await sw.run_sweep(spec, tmp_path / "out", registry=make_registry(up3), progress=False)
    assert up3.calls == 0
    again = {(r["arch"], r["benchmark"], r["id"]): r.get("output") for r in log3.records}
    assert again == {k: v.get("output") for k, v in by.items()}

    paths = rp.write_report(tmp_path / "out")
    md = Path(paths["markdown"]).read_text()
    assert "| tiny-moa | math500 | 3 |" in md and "null-model" in md
    assert Path(paths["plot"]).stat().st_size > 1000
    outs = json.loads((tmp_path / "out" / "alpaca_eval" / "tiny-moa" / "model_outputs.json").read_text())
    assert len(outs) == 3 and {"instruction", "output", "generator", "dataset"} <= set(outs[0])
    fc = (tmp_path / "out" / "mt_bench" / "model_answer" / "scripted.jsonl").read_text().splitlines()
    assert len(fc) == 2 and len(json.loads(fc[0])["choices"][0]["turns"]) == 2


async def test_cancelled_sweep_resumes_without_duplicates(tmp_path):
    spec = _spec(tmp_path, benchmarks=[{"name": "math500", "n": 8}, {"name": "alpaca_eval", "n": 8}], concurrency=2)
    up = ScriptedUpstream(delay_s=0.05)
    task = asyncio.create_task(sw.run_sweep(spec, tmp_path / "out", registry=make_registry(up), progress=False))
    results = tmp_path / "out" / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        if results.exists() and len(results.read_text().splitlines()) >= 10:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    partial = len(results.read_text().splitlines())
    assert 10 <= partial < 48
    with open(results, "a") as f:
        f.write('{"arch": "scripted", "bench')  # a torn line, as a kill mid-write leaves it
    up2 = ScriptedUpstream()
    log = await sw.run_sweep(spec, tmp_path / "out", registry=make_registry(up2), progress=False)
    keys = [(r["arch"], r["benchmark"], r["id"]) for r in log.records]
    assert len(keys) == len(set(keys)) == 48
    assert up2.calls < up.calls + up2.calls  # the resumed run did not redo the finished part


def test_killed_subprocess_sweep_resumes(tmp_path):
    """SIGKILL a sweep process halfway, run it again: every question once, none lost."""
    (tmp_path / "tiny-moa.yaml").write_text(ARCH)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from bench_fakes import ScriptedUpstream, make_registry
        from archon_server.bench import sweep as sw
        spec = sw.SweepSpec.model_validate(dict(name="k", judge="judge", concurrency=2,
            architectures=["scripted", {str(tmp_path / 'tiny-moa.yaml')!r}],
            benchmarks=[{{"name": "math500", "n": 10}}, {{"name": "mt_bench", "n": 5}}]))
        asyncio.run(sw.run_sweep(spec, {str(tmp_path / 'out')!r}, registry=make_registry(ScriptedUpstream(delay_s=float(sys.argv[1]))), progress=False))
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), "0.1"], env=env)
    results = tmp_path / "out" / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if results.exists() and len(results.read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = len(results.read_text().splitlines())
    assert 6 <= first < 30
    subprocess.run([sys.executable, str(script), "0"], env=env, check=True, timeout=120)
    recs = [json.loads(line) for line in results.read_text().splitlines() if line.strip().endswith("}")]
    keys = [(r["arch"], r["benchmark"], r["id"]) for r in recs]
    assert len(keys) == len(set(keys)) == 30


def test_sweep_file_validation(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("architectures: []\nbenchmarks: [{name: math500, split: train}]\n")
    from archon_server.spec import SpecError

    with pytest.raises(SpecError) as e:
        sw.load_sweep(p)
    assert any("architectures" in m for m in e.value.errors) and any("split" in m for m in e.value.errors)
    assert sw.load_sweep(REPO / "benchmarks" / "smoke.yaml").name == "smoke"


async def test_sweep_keeps_traces_when_asked(tmp_path):
    spec = _spec(tmp_path, architectures=[str(tmp_path / "tiny-moa.yaml")], keep_traces=True,
                 benchmarks=[{"name": "math500", "split": "dev", "n": 2}, {"name": "mt_bench", "n": 1}])
    log = await sw.run_sweep(spec, tmp_path / "out", registry=make_registry(ScriptedUpstream()), progress=False)
    math = [r for r in log.records if r["benchmark"] == "math500"]
    assert len(math) == 2 and all(r["trace"]["calls"] == r["calls"] == 3 for r in math)
    [mt] = [r for r in log.records if r["benchmark"] == "mt_bench"]
    assert len(mt["traces"]) == 2 and sum(t["calls"] for t in mt["traces"]) == mt["calls"]  # one trace per turn
    on_disk = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sum("trace" in r or "traces" in r for r in on_disk) == 3
    plain = await sw.run_sweep(_spec(tmp_path, architectures=[str(tmp_path / "tiny-moa.yaml")],
                                     benchmarks=[{"name": "math500", "split": "dev", "n": 1}]),
                               tmp_path / "out2", registry=make_registry(ScriptedUpstream()), progress=False)
    assert "trace" not in plain.records[0]  # off by default: results stay small


class _RecordingJudge(ScriptedUpstream):
    """Records the max_tokens of every generating judge call (MT-Bench, Arena-Hard prompts)."""

    def __init__(self) -> None:
        super().__init__()
        self.judge_caps: list[int] = []

    async def chat(self, request):  # type: ignore[no-untyped-def]
        text = " ".join(m["content"] for m in request.messages)
        if "[[rating]]" in text or "<|User Prompt|>" in text:
            self.judge_caps.append(request.params.max_tokens)
        return await super().chat(request)


@pytest.mark.parametrize("cap, expected", [(None, {2048, 4096}), (77, {77})])
async def test_judge_max_tokens_caps_the_generating_judges(tmp_path, cap, expected):
    up = _RecordingJudge()
    spec = _spec(tmp_path, architectures=["scripted"], judge_max_tokens=cap,
                 benchmarks=[{"name": "mt_bench", "n": 1}, {"name": "arena_hard", "n": 1}])
    log = await sw.run_sweep(spec, tmp_path / "out", registry=make_registry(up), progress=False)
    assert len(up.judge_caps) == 2 + 2 and set(up.judge_caps) == expected  # two turns, two game orders
    assert all(r["score"] is not None for r in log.records)


async def test_resume_with_a_changed_sweep_is_refused_naming_the_change(tmp_path):
    spec = _spec(tmp_path, params={"max_tokens": 32}, benchmarks=[{"name": "math500", "split": "dev", "n": 2}])
    out = tmp_path / "out"
    await sw.run_sweep(spec, out, registry=make_registry(ScriptedUpstream()), progress=False)
    saved = (out / "sweep.json").read_text()
    changed = _spec(tmp_path, params={"max_tokens": 8}, architectures=["scripted", "null-model"],
                    benchmarks=[{"name": "math500", "split": "dev", "n": 2}])
    up = ScriptedUpstream()
    with pytest.raises(sw.SweepMismatch) as e:
        await sw.run_sweep(changed, out, registry=make_registry(up), progress=False)
    msg = " ".join(e.value.errors)
    assert "params.max_tokens: 32 -> 8" in msg and "6 results" in msg
    assert f"architectures: dropped [{str(tmp_path / 'tiny-moa.yaml')!r}]" in msg
    assert up.calls == 0 and (out / "sweep.json").read_text() == saved  # nothing run, the old definition kept
    assert len((out / "runs.jsonl").read_text().splitlines()) == 1
    # what does not change a result may: concurrency, caps, traces
    same = _spec(tmp_path, params={"max_tokens": 32}, concurrency=1, backend_concurrency={}, keep_traces=True,
                 benchmarks=[{"name": "math500", "split": "dev", "n": 2}])
    log = await sw.run_sweep(same, out, registry=make_registry(up), progress=False)
    assert up.calls == 0 and len(log.records) == 6


async def test_a_folder_of_an_older_archon_server_is_refused_in_one_line(tmp_path):
    """Its sweep.json is the same sweep, but its results came from other splits and parameters (an older
    archon-server's): refused, saying so, instead of resumed into a mix."""
    from archon_server.bench.definition import DEFINITION_VERSION

    spec = _spec(tmp_path, architectures=["scripted"], benchmarks=[{"name": "math500", "split": "dev", "n": 2, "seed": 3}])
    out = tmp_path / "out"
    await sw.run_sweep(spec, out, registry=make_registry(ScriptedUpstream()), progress=False)
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["definition_version"] == DEFINITION_VERSION
    for old in (None, 1):
        older = {k: v for k, v in saved.items() if k != "definition_version"} | ({} if old is None else {"definition_version": old})
        (out / "sweep.json").write_text(json.dumps(older))
        up = ScriptedUpstream()
        with pytest.raises(sw.SweepMismatch) as e:
            await sw.run_sweep(spec, out, registry=make_registry(up), progress=False)
        [line] = e.value.errors
        assert f"{out} holds 2 results" in line and "older archon-server" in line and "dev/test splits" in line, line
        assert f"definition version {old if old is not None else 'none'}" in line and "new --out" in line, line
        assert up.calls == 0 and json.loads((out / "sweep.json").read_text()) == older  # nothing run or rewritten


@pytest.mark.parametrize("params, resumed", [
    (None, True),  # version 3 changed only what params do: a sweep without them gives version 2's results
    ({"max_tokens": 32, "temperature": 0.0, "top_p": 1.0}, True),  # nothing of it was filled in by version 2
    ({"max_tokens": 32}, False),  # version 2 ran it at temperature 0.7, top_p 1.0; today the architecture's own
])
async def test_a_version_2_folder_is_resumed_only_where_its_params_give_the_same_results(tmp_path, params, resumed):
    spec = _spec(tmp_path, architectures=["scripted"], params=params, benchmarks=[{"name": "math500", "split": "dev", "n": 2}])
    out = tmp_path / "out"
    await sw.run_sweep(spec, out, registry=make_registry(ScriptedUpstream()), progress=False)
    saved = json.loads((out / "sweep.json").read_text())
    (out / "sweep.json").write_text(json.dumps({**saved, "definition_version": 2}))
    up = ScriptedUpstream()
    if resumed:
        log = await sw.run_sweep(spec, out, registry=make_registry(up), progress=False)
        assert up.calls == 0 and len(log.records) == 2
    else:
        with pytest.raises(sw.SweepMismatch) as e:
            await sw.run_sweep(spec, out, registry=make_registry(up), progress=False)
        assert "definition version 2" in e.value.errors[0] and up.calls == 0


async def test_pass_at_k_is_compared_with_its_default_filled_in(tmp_path):
    """A sweep.json whose pass_at has no k (or an empty one) is the same sweep as the file that leaves k out."""
    spec = _spec(tmp_path, architectures=["scripted"], benchmarks=[{"name": "math500", "n": 2, "pass_at": {"n": 5}}])
    out = tmp_path / "out"
    await sw.run_sweep(spec, out, registry=make_registry(ScriptedUpstream()), progress=False)
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["benchmarks"][0]["pass_at"] == {"n": 5, "k": [1]}
    for stored in ({"n": 5}, {"n": 5, "k": []}):
        saved["benchmarks"][0]["pass_at"] = stored
        (out / "sweep.json").write_text(json.dumps(saved))
        up = ScriptedUpstream()
        log = await sw.run_sweep(spec, out, registry=make_registry(up), progress=False)
        assert up.calls == 0 and len(log.records) == 2
    # a k that differs from the default still does
    changed = _spec(tmp_path, architectures=["scripted"], benchmarks=[{"name": "math500", "n": 2, "pass_at": {"n": 5, "k": [1, 5]}}])
    with pytest.raises(sw.SweepMismatch, match=re.escape("changed: benchmarks[0].pass_at.k: [1] -> [1, 5];")):
        await sw.run_sweep(changed, out, registry=make_registry(ScriptedUpstream()), progress=False)


async def test_judge_and_logprob_architectures_are_checked_before_any_call(tmp_path):
    from archon_server.spec import SpecError

    sweep = tmp_path / "s.yaml"
    sweep.write_text("judge: jduge\narchitectures: [scripted]\nbenchmarks: [{name: math500, n: 2}, {name: alpaca_eval, n: 2}]\n")
    up = ScriptedUpstream()
    with pytest.raises(SpecError) as e:
        await sw.run_sweep(sw.load_sweep(sweep), tmp_path / "out", registry=make_registry(up), progress=False)
    assert e.value.source == str(sweep) and e.value.errors[0].startswith("judge: 'jduge'")
    sweep.write_text("architectures: [scripted]\nbenchmarks: [{name: math500, n: 2}, {name: mt_bench, n: 1}]\n")
    with pytest.raises(SpecError) as e:
        await sw.run_sweep(sw.load_sweep(sweep), tmp_path / "out", registry=make_registry(up), progress=False)
    assert e.value.source == str(sweep) and e.value.errors[0].startswith("judge:") and "mt_bench" in e.value.errors[0]
    # MMLU logprob scores one model: a sweep none of whose architectures is one is refused up front (one that has
    # one runs, the others' pairs are skipped: tests/test_bench_mmlu_logprob.py)
    (tmp_path / "tiny-moa.yaml").write_text(ARCH)
    sweep.write_text(f"architectures: [{tmp_path / 'tiny-moa.yaml'}, null-model]\n"
                     "benchmarks: [{name: math500, n: 2}, {name: mmlu, n: 2, mode: logprob}]\n")
    with pytest.raises(SpecError) as e:
        await sw.run_sweep(sw.load_sweep(sweep), tmp_path / "out", registry=make_registry(up), progress=False)
    [line] = e.value.errors
    assert line.startswith("architectures: none of 'tiny-moa', 'null-model'") and "benchmarks[1] (mode logprob)" in line
    assert up.calls == 0 and not (tmp_path / "out").exists()


async def test_an_unexpected_failure_cancels_the_other_questions_before_closing(tmp_path, monkeypatch):
    """A question that raises past run_item stops the sweep; the questions still in flight are cancelled before the
    cache closes, so none of them writes a bogus record ("Cannot operate on a closed database") or runs on."""
    spec = _spec(tmp_path, architectures=["scripted"], concurrency=4, benchmarks=[{"name": "math500", "n": 8}])
    real = sw.SweepRun.run_item

    async def run_item(self, arch, s, item):  # type: ignore[no-untyped-def]
        if item.id == self.items()[1][1].id:
            raise RuntimeError("boom")
        return await real(self, arch, s, item)

    monkeypatch.setattr(sw.SweepRun, "run_item", run_item)
    up = ScriptedUpstream(delay_s=0.05)
    with pytest.raises(RuntimeError, match="boom"):
        await sw.run_sweep(spec, tmp_path / "out", registry=make_registry(up), progress=False)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()] == []
    recs = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()] \
        if (tmp_path / "out" / "results.jsonl").exists() else []
    assert not [r for r in recs if r.get("error")]


def _data_copy(tmp_path: Path) -> Path:
    """A data folder beside the default: links to the shipped files, with the MT-Bench judge prompts and the AlpacaEval
    eval set marked, so a file read from the default folder instead shows."""
    from archon_server.bench.paths import data_dir

    src = data_dir()
    root = tmp_path / "data"
    for top in src.iterdir():
        if top.name not in ("mt_bench", "alpaca_eval"):
            (root / top.name).parent.mkdir(parents=True, exist_ok=True)
            (root / top.name).symlink_to(top)
    for d in ("mt_bench", "alpaca_eval", "alpaca_eval/model_outputs"):
        (root / d).mkdir(parents=True, exist_ok=True)
        for f in (src / d).iterdir():
            if not (root / d / f.name).exists() and f.name not in ("judge_prompts.jsonl", "gpt4_1106_preview.json", "model_outputs"):
                (root / d / f.name).symlink_to(f)
    prompts = [json.loads(line) for line in (src / "mt_bench" / "judge_prompts.jsonl").read_text().splitlines() if line.strip()]
    (root / "mt_bench" / "judge_prompts.jsonl").write_text(
        "".join(json.dumps({**p, "system_prompt": "MARKED-DATA " + p["system_prompt"]}) + "\n" for p in prompts))
    rows = json.loads((src / "alpaca_eval" / "model_outputs" / "gpt4_1106_preview.json").read_text())
    (root / "alpaca_eval" / "model_outputs" / "gpt4_1106_preview.json").write_text(
        json.dumps([{**r, "dataset": "MARKED-DATA"} for r in rows]))
    return root


async def test_data_folder_is_used_for_judge_prompts_and_exports(tmp_path):
    data = _data_copy(tmp_path)
    up = _RecordingJudge()
    seen: list[str] = []
    real = up.chat

    async def chat(request):  # type: ignore[no-untyped-def]
        seen.append(request.messages[0]["content"])
        return await real(request)

    up.chat = chat  # type: ignore[method-assign]
    spec = _spec(tmp_path, architectures=["scripted"], benchmarks=[{"name": "mt_bench", "n": 1}, {"name": "alpaca_eval", "n": 2}])
    await sw.run_sweep(spec, tmp_path / "out", registry=make_registry(up), progress=False, data_root=str(data))
    judge_systems = [s for s in seen if "[[rating]]" in s or "impartial judge" in s]
    assert judge_systems and all(s.startswith("MARKED-DATA ") for s in judge_systems)
    rp.write_report(tmp_path / "out", data_root=str(data))
    outs = json.loads((tmp_path / "out" / "alpaca_eval" / "scripted" / "model_outputs.json").read_text())
    assert {o["dataset"] for o in outs} == {"MARKED-DATA"}


class RecordingUpstream(ScriptedUpstream):
    """Records the sampling params of every call, with whether it asked for several samples (the writers here)."""

    def __init__(self):
        super().__init__()
        self.seen: list[SamplingParams] = []

    async def chat(self, request: ChatRequest):
        self.seen.append(request.params)
        return await super().chat(request)


BEST_OF = """
name: best-of-3
layers:
  - - {type: generator, model: proposer-1, samples: 3, max_tokens: 100, temperature: 0.9, top_p: 0.8}
  - - {type: ranker, model: judge, temperature: 0.3, top_p: 0.6}
"""


@pytest.mark.parametrize("params, writers, ranker", [
    # temperature alone: the writers keep their own length (100, not SamplingParams' 512) and sampling; the ranker, a
    # judge, samples its own way (FinalOverrides do not reach judges)
    ({"temperature": 0.0}, (100, 0.9, 0.8), (0.3, 0.6, 512)),
    # a max_tokens the sweep sets still reaches the writers a selecting last layer picks from
    ({"max_tokens": 40}, (40, 0.9, 0.8), (0.3, 0.6, 512)),
    (None, (100, 0.9, 0.8), (0.3, 0.6, 512)),
])
def test_only_the_params_a_sweep_sets_reach_a_selecting_final_stage(tmp_path, params, writers, ranker):
    (tmp_path / "best-of-3.yaml").write_text(BEST_OF)
    up = RecordingUpstream()
    spec = sw.SweepSpec.model_validate({"name": "bo", "architectures": [str(tmp_path / "best-of-3.yaml")], "params": params,
                                        "benchmarks": [{"name": "math500", "n": 1}]})
    log = asyncio.run(sw.run_sweep(spec, tmp_path / "o", registry=make_registry(up), progress=False, cache=False))
    assert not log.records[0].get("error"), log.records[0]
    gen = [p for p in up.seen if p.n == 3]
    rank = [p for p in up.seen if p.n == 1]  # the ranking, then its re-ask (the scripted judge gives no ranking)
    assert len(gen) == 1 and rank, up.seen
    assert (gen[0].max_tokens, gen[0].temperature, gen[0].top_p) == writers
    assert (rank[0].temperature, rank[0].top_p, rank[0].max_tokens) == ranker


def test_params_a_sweep_leaves_unset_keep_the_writing_final_stage_own(tmp_path):
    """A max_tokens alone does not reset the final writer's temperature and top_p to SamplingParams' 0.7 and 1.0."""
    (tmp_path / "cool.yaml").write_text("name: cool\nlayers:\n  - - {type: generator, model: proposer-1, temperature: 0.2, top_p: 0.5}\n")
    up = RecordingUpstream()
    spec = sw.SweepSpec.model_validate({"name": "c", "architectures": [str(tmp_path / "cool.yaml")], "params": {"max_tokens": 40},
                                        "benchmarks": [{"name": "math500", "n": 1}]})
    asyncio.run(sw.run_sweep(spec, tmp_path / "o", registry=make_registry(up), progress=False, cache=False))
    [p] = up.seen
    assert (p.max_tokens, p.temperature, p.top_p) == (40, 0.2, 0.5)


async def test_a_resumed_sweep_says_so_on_stderr_through_the_shared_reporter(tmp_path, capsys):
    """`bench run` and `search run` show progress one way (bench.progress.Reporter, on stderr): a resumed sweep says
    how many results it keeps before its bar; --no-progress (progress=False) prints nothing."""
    spec = sw.SweepSpec.model_validate({"name": "r", "architectures": ["scripted"], "benchmarks": [{"name": "math500", "n": 3}]})
    await sw.run_sweep(spec, tmp_path / "o", registry=make_registry(ScriptedUpstream()), progress=False)
    lines = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    (tmp_path / "o" / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert capsys.readouterr().err == ""
    await sw.run_sweep(spec, tmp_path / "o", registry=make_registry(ScriptedUpstream()), progress=True)
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "r: resuming, 2 results already saved; 1 to run", err


def test_a_sweep_stop_given_as_a_string_is_a_list_of_one_as_in_a_request(tmp_path):
    """`params: {stop: "\\n"}`: OpenAI's `stop` is a string or a list; the sweep takes what the API takes
    (archon_server.sampling_fields.Stop), so the final stage is asked to stop at ["\\n"]."""
    (tmp_path / "cool.yaml").write_text("name: cool\nlayers:\n  - - {type: generator, model: proposer-1}\n")
    (tmp_path / "s.yaml").write_text(f'params: {{stop: "\\n"}}\narchitectures: [{tmp_path / "cool.yaml"}]\n'
                                     "benchmarks: [{name: math500, n: 1}]\n")
    spec = sw.load_sweep(tmp_path / "s.yaml")
    up = RecordingUpstream()
    log = asyncio.run(sw.run_sweep(spec, tmp_path / "o", registry=make_registry(up), progress=False, cache=False))
    assert not log.records[0].get("error"), log.records[0]
    [p] = up.seen
    assert p.stop == ["\n"]


@pytest.mark.parametrize("field, value", [
    ("temperature", 3), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("max_tokens", 0),
    ("max_tokens", 131073), ("top_logprobs", 21), ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]),
    ("seed", 2**63), ("top_k", -2),
])
def test_a_sweep_param_is_refused_as_a_chat_request_refuses_it_in_the_same_words(tmp_path, field, value):
    """One place for the sampling fields' constraints: a sweep's params and a chat request refuse the same values
    with the same message for the same field (the API answers it as a 400 naming the field)."""
    from pydantic import ValidationError

    from archon_server.api.chat.protocol import ChatCompletionRequest
    from archon_server.spec import SpecError

    with pytest.raises(ValidationError) as api:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], field: value})
    [api_err] = api.value.errors()
    assert api_err["loc"][0] == field
    (tmp_path / "s.yaml").write_text(json.dumps({"params": {field: value}, "architectures": ["scripted"],
                                                 "benchmarks": [{"name": "math500", "n": 1}]}))
    with pytest.raises(SpecError) as bench:
        sw.load_sweep(tmp_path / "s.yaml")
    [line] = bench.value.errors
    msg = api_err["msg"].removeprefix("Value error, ")  # pydantic's prefix, which both the API and a SpecError drop
    assert line.startswith(f"params.{field}") and line.endswith(msg), (line, api_err)


def test_top_logprobs_without_logprobs_is_refused_by_a_sweep_as_by_a_chat_request(tmp_path):
    (tmp_path / "s.yaml").write_text('{"params": {"top_logprobs": 2}, "architectures": ["scripted"], '
                                     '"benchmarks": [{"name": "math500", "n": 1}]}')
    from archon_server.spec import SpecError

    with pytest.raises(SpecError) as e:
        sw.load_sweep(tmp_path / "s.yaml")
    assert e.value.errors[0].startswith("params.top_logprobs") and "logprobs must be set to true" in e.value.errors[0]
    assert sw.SweepParams(logprobs=True, top_logprobs=2).final().top_logprobs == 2


def test_a_file_a_sweep_names_is_looked_for_in_its_folder_then_the_working_directory(tmp_path, monkeypatch):
    """One lookup (graph.catalog.find_file) for architecture files and configs, in Catalog.resolve's order; the
    "no such file" error names the places in that order."""
    from archon_server.graph.catalog import find_file, looked_in

    proj, cwd = tmp_path / "proj", tmp_path / "cwd"
    proj.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (cwd / "a.yaml").write_text("name: from-cwd\nlayers:\n  - - {type: generator, model: proposer-1}\n")
    (proj / "a.yaml").write_text("name: from-proj\nlayers:\n  - - {type: generator, model: proposer-1}\n")
    (cwd / "only-cwd.yaml").write_text("x")
    assert find_file("a.yaml", proj) == proj / "a.yaml"  # the sweep's folder first
    assert find_file("only-cwd.yaml", proj) == Path("only-cwd.yaml")  # then the working directory
    assert find_file("none.yaml", proj) is None
    assert looked_in("none.yaml", proj) == f"looked in {proj}, then in the working directory"
    archs = sw.resolve_architectures(["a.yaml"], make_registry(RecordingUpstream()), None, proj)
    assert list(archs) == ["from-proj"]  # what the sweep runs is what find_file found
    with pytest.raises(sw.SpecError) as e:
        sw.resolve_architectures(["none.yaml"], make_registry(RecordingUpstream()), None, proj, source="s.yaml")
    assert e.value.errors == [f"architectures: none.yaml: no such file (looked in {proj}, then in the working directory)"]
