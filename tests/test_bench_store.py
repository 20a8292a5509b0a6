"""The shared sweep store (bench/store.py) on SQLite and real PostgreSQL: claims, leases, idempotent rows, the
call cache; then worker processes splitting one sweep on PostgreSQL, one SIGKILLed, without duplicates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from archon_server.bench import report as rp
from archon_server.bench import sweep as sw
from archon_server.bench.store import StoreResults, SweepMismatch, SweepStore

sys.path.insert(0, str(Path(__file__).parent))
from bench_fakes import ScriptedUpstream, make_registry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _rec(arch: str, item: str, **kw) -> dict:
    return {"arch": arch, "benchmark": "math500", "id": item, "score": 1.0, **kw}


def test_claims_leases_and_idempotent_rows(storage_url: str) -> None:
    # A lease long enough that a loaded machine (PostgreSQL, busy cores) cannot let it lapse between a claim and the
    # next line's check, which must see it held; then a sleep past it to see it go stale (it was 0.5 s: too close).
    lease_s = 2.0
    a = SweepStore(storage_url, "s", lease_s=lease_s)
    b_results = StoreResults(a.engine, "s", lease_s=lease_s, worker="host-b:2")
    a.results.register({"name": "s", "n": 1})
    assert a.results.claim_sync("m", "math500", "q1")
    assert not b_results.claim_sync("m", "math500", "q1")  # held by a live worker
    a.results.append_sync(_rec("m", "q1"))
    assert not b_results.claim_sync("m", "math500", "q1")  # done: never run twice
    a.results.append_sync(_rec("m", "q1", score=0.0))  # a late duplicate write changes nothing
    assert [r["score"] for r in a.results.records] == [1.0]

    assert a.results.claim_sync("m", "math500", "q2")  # a claims q2 and "dies": no heartbeat, no result
    assert not b_results.claim_sync("m", "math500", "q2")
    time.sleep(lease_s + 0.2)
    assert b_results.claim_sync("m", "math500", "q2")  # the lease went stale: taken over
    a.results.append_sync(_rec("m", "q2", score=0.5))  # the dead worker's late answer is not kept
    b_results.append_sync(_rec("m", "q2", score=0.25))
    assert {r["id"]: r["score"] for r in a.results.records} == {"q1": 1.0, "q2": 0.25}

    assert b_results.claim_sync("m", "math500", "q3")
    b_results.append_sync(_rec("m", "q3", error="Timeout: upstream"))
    assert not b_results.claim_sync("m", "math500", "q3")  # failed in *this* run: not retried in a loop
    later = StoreResults(a.engine, "s", worker="host-c:3")
    assert later.claim_sync("m", "math500", "q3")  # a later run retries a failure
    assert later.done == {sw.result_key("m", "math500", q) for q in ("q1", "q2")}
    assert a.results.counts() == {"done": 2, "running": 1}

    with pytest.raises(SweepMismatch):
        StoreResults(a.engine, "s").register({"name": "s", "n": 2})

    a.calls.put("k", {"x": 1})
    a.calls.put("k", {"x": 2})  # first writer wins
    assert a.calls.get("k") == {"x": 1} and a.calls.get("nope") is None and len(a.calls) == 1
    a.close()


def _spec(tmp_path: Path) -> sw.SweepSpec:
    return sw.SweepSpec.model_validate(dict(
        name="shared", judge="judge", concurrency=2, architectures=["scripted", "null-model"],
        benchmarks=[{"name": "math500", "n": 8}, {"name": "mt_bench", "n": 4}]))


async def test_two_in_process_workers_split_a_sweep_and_export_the_same_jsonl(tmp_path: Path, storage_url: str) -> None:
    import asyncio

    spec = _spec(tmp_path)
    ups = [ScriptedUpstream(delay_s=0.02), ScriptedUpstream(delay_s=0.02)]
    logs = await asyncio.gather(*(sw.run_sweep(spec, tmp_path / f"out{i}", registry=make_registry(up), progress=False,
                                               store_url=storage_url) for i, up in enumerate(ups)))
    keys = [(r["arch"], r["benchmark"], r["id"]) for r in logs[0].records]
    assert len(keys) == len(set(keys)) == 24
    assert (tmp_path / "out0" / "results.jsonl").read_text() == (tmp_path / "out1" / "results.jsonl").read_text()
    assert all(up.calls for up in ups)  # both did part of the work
    alone = ScriptedUpstream()
    await sw.run_sweep(spec, tmp_path / "solo", registry=make_registry(alone), progress=False)
    assert sum(up.calls for up in ups) == alone.calls  # together they paid for the sweep exactly once
    md = Path(rp.write_report(tmp_path / "out0")["markdown"]).read_text()
    assert "| scripted | math500 | 8 |" in md


@pytest.mark.slow
def test_workers_on_postgresql_split_one_sweep_one_killed_then_report(tmp_path: Path, postgres_url: str) -> None:
    """Three `archon bench`-style worker processes share one sweep on real PostgreSQL; one is SIGKILLed
    mid-sweep; the survivors take its questions over when its lease goes stale: every question exactly once."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from bench_fakes import ScriptedUpstream, make_registry
        from archon_server.bench import sweep as sw
        spec = sw.SweepSpec.model_validate(dict(name="k", judge="judge", concurrency=2,
            architectures=["scripted", "null-model"],
            benchmarks=[{{"name": "math500", "n": 12}}, {{"name": "mt_bench", "n": 6}}]))
        up = ScriptedUpstream(delay_s=0.1)
        asyncio.run(sw.run_sweep(spec, sys.argv[1], registry=make_registry(up), progress=False,
                                 store_url={postgres_url!r}, store_lease_s=3))
        print("calls", up.calls)
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = lambda i: subprocess.Popen([sys.executable, str(script), str(tmp_path / f"w{i}")], env=env,  # noqa: E731
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = start(0)
    probe = SweepStore(postgres_url, "k")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and probe.results.counts().get("done", 0) < 4:
            time.sleep(0.05)
        workers = [start(1), start(2)]
        time.sleep(0.5)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        held = probe.results.counts().get("running", 0)
        outs = [w.communicate(timeout=240) for w in workers]
        for w, (_, err) in zip(workers, outs):
            assert w.returncode == 0, err[-3000:]
        assert probe.results.counts() == {"done": 36}
    finally:
        for p in [victim, *locals().get("workers", [])]:
            if p.poll() is None:
                p.kill()
        probe.close()
    assert held >= 1  # the kill left questions claimed: the survivors had something to take over
    for i in (1, 2):
        recs = [json.loads(x) for x in (tmp_path / f"w{i}" / "results.jsonl").read_text().splitlines()]
        keys = [(r["arch"], r["benchmark"], r["id"]) for r in recs]
        assert len(keys) == len(set(keys)) == 36
    # `archon bench report OUT --store URL` rewrites results.jsonl from the store, then the usual report.
    (tmp_path / "w0").mkdir(exist_ok=True)
    (tmp_path / "w0" / "results.jsonl").unlink(missing_ok=True)
    rep = subprocess.run([sys.executable, "-m", "archon_server", "bench", "report", str(tmp_path / "w0"),
                          "--store", postgres_url, "--sweep", "k"], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "| scripted | math500 | 12 |" in rep.stdout
    assert len((tmp_path / "w0" / "results.jsonl").read_text().splitlines()) == 36


async def test_waiting_for_leased_questions_is_reported(tmp_path: Path) -> None:
    """A worker done with its own questions says it waits for those other workers hold (the progress bar shows it)."""
    a = SweepStore(f"sqlite:///{tmp_path / 's.db'}", "w", lease_s=3)
    b = StoreResults(a.engine, "w", lease_s=3, worker="host-b:2")
    assert a.results.claim_sync("m", "math500", "q1") and not b.claim_sync("m", "math500", "q1")
    told: list[int] = []

    def on_wait(n: int) -> None:
        told.append(n)
        a.results.append_sync(_rec("m", "q1"))  # the other worker finishes while this one waits

    assert await b.wait_for_others(on_wait=on_wait) == set()
    assert told == [1]
    a.close()


def test_store_names_what_changed(storage_url: str) -> None:
    s = SweepStore(storage_url, "c")
    try:
        s.results.register({"name": "c", "params": {"max_tokens": 32}, "concurrency": 8})
        StoreResults(s.engine, "c").register({"name": "c", "params": {"max_tokens": 32}, "concurrency": 2})  # per worker
        with pytest.raises(SweepMismatch, match=r"params.max_tokens: 32 -> 8"):
            StoreResults(s.engine, "c").register({"name": "c", "params": {"max_tokens": 8}, "concurrency": 8})
        assert "c" in s.sweeps()
    finally:
        s.close()


def test_store_refuses_a_sweep_an_older_archon_server_registered(storage_url: str) -> None:
    """The stored definition is the same sweep, but an older archon-server (no definition version) made its rows
    with other splits and parameters: a worker of this one is refused in one line. pass@k's k compares with its
    default filled in."""
    from archon_server.bench.definition import DEFINITION_VERSION
    import sqlalchemy as sa

    from archon_server.bench.store import SWEEPS

    s = SweepStore(storage_url, "old")
    try:
        definition = {"name": "old", "benchmarks": [{"name": "math500", "pass_at": {"n": 5}}]}
        with s.engine.begin() as con:
            con.execute(SWEEPS.insert().values(sweep="old", spec=json.dumps(definition), created=time.time()))
        with pytest.raises(SweepMismatch) as e:
            s.results.register(definition)
        [line] = e.value.errors
        assert "the store's sweep 'old'" in line and "older archon-server" in line and "another store" in line, line
        # registered by this one: stamped, and k left out equals the default k
        StoreResults(s.engine, "new").register({**definition, "name": "new"})
        with s.engine.connect() as con:
            stored = json.loads(con.execute(sa.select(SWEEPS.c.spec).where(SWEEPS.c.sweep == "new")).scalar_one())
        assert stored["definition_version"] == DEFINITION_VERSION
        StoreResults(s.engine, "new").register({"name": "new", "benchmarks": [{"name": "math500", "pass_at": {"n": 5, "k": [1]}}]})
    finally:
        s.close()
