"""optuna-dashboard on a real PostgreSQL study: the trials and our user attributes (graph YAML, cost, score per
stage) come back from the dashboard's own JSON API, served by ``archon search dashboard``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from archon_server.search.config import load_search_config
from archon_server.search.runner import run_search
from archon_server.spec import load_text, parse_architecture
from archon_server.testing.upstream import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search" / "tiny-scripted.yaml"

pytest.importorskip("optuna_dashboard")  # in the test extra; a bare install has no dashboard


def test_dashboard_serves_the_postgresql_study_with_our_attributes(tmp_path: Path, postgres_url: str) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["study"].update({"name": "dash", "sampler": {"type": "random", "seed": 1}})
    data["evaluation"].update({"stages": [4], "test_top": 1, "baselines": False})
    data["evaluation"]["scripted"]["n_dev"] = 8
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    res = asyncio.run(run_search(load_search_config(cfg_path), storage=postgres_url, n_trials=4, do_finalize=False))
    study = res.study

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "archon_server.search", "dashboard", "--storage", postgres_url,
                             "--study", "dash", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"127.0.0.1:{port}/dashboard/studies/" in line, line
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = httpx.get(f"{base}/api/studies", timeout=10).json()["study_summaries"]
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "dashboard did not start"
                time.sleep(0.3)
        (entry,) = [s for s in studies if s["study_name"] == "dash"]
        detail = httpx.get(f"{base}/api/studies/{entry['study_id']}", timeout=30).json()
        assert httpx.get(f"{base}/dashboard/studies/{entry['study_id']}", timeout=10).status_code == 200  # the page
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    assert len(detail["trials"]) == len(study.trials)
    assert detail["objective_names"] == ["dev score - lambda x cost"]
    keys = {a["key"] for a in detail["union_user_attrs"]}
    assert {"spec", "cost_per_query", "dev_score", "stage_4", "arch_key"} <= keys
    done = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert done
    for t in done:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        ours = study.trials[t["number"]].user_attrs
        spec = parse_architecture(load_text(attrs["spec"]))  # the graph YAML, whole and readable
        assert spec.name == f"dash-t{t['number']}"
        assert float(attrs["cost_per_query"]) == pytest.approx(ours["cost_per_query"])
        assert float(attrs["stage_4"]) == pytest.approx(ours["stage_4"])
        assert [v["step"] for v in t["intermediate_values"]] == [4, 8]  # one score per stage, as reported
