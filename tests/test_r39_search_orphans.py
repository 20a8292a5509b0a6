"""``archon search run --workers N`` killed with kill -9 leaves no workers behind.

Its workers are processes of their own; the parent waited on them, but nothing told them it was gone: killed with
SIGKILL, it left them running the study unwatched (a second run started meanwhile met them as strangers). A spawned
worker now gets SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``, backends/process.die_with_parent) and ends as
on Ctrl-C, once (the kernel signals each thread that inherited the setting; a second interrupt had broken into the
handing back and left the trial RUNNING): its trial handed back and queued again, nothing left running. Real
processes, a real SQLite study.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from archon_server.testing.procs import alive, descendants

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search" / "tiny-scripted.yaml"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # this checkout's


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _wait(cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_workers_end_when_their_parent_is_killed(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["study"].update(name="orphans", n_trials=40, heartbeat_interval=1, grace_period=4,
                         sampler={"type": "random", "seed": 0})
    data["evaluation"].update(stages=[], test_top=1, baselines=False)
    data["evaluation"]["scripted"].update(n_dev=40, step_sleep_s=0.2)  # a trial takes seconds: the kill lands inside one
    cfg = tmp_path / "orphans.yaml"
    cfg.write_text(yaml.safe_dump(data))
    url = f"sqlite:///{tmp_path}/orphans.db"
    parent = subprocess.Popen([sys.executable, "-m", "archon_server", "search", "run", str(cfg), "--storage", url,
                               "--workers", "2", "--no-export", "--no-finalize", "--no-progress"],
                              cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []

    def spawned() -> list[int] | None:
        found = [p for p in descendants(parent.pid) if "--spawned" in _cmdline(p)]
        return found if len(found) == 2 else None

    try:
        workers = _wait(spawned, 60, "two workers started")

        def running() -> int:
            out = subprocess.run([sys.executable, "-m", "archon_server", "search", "status", str(cfg), "--storage", url],
                                 cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60, check=False)
            return json.loads(out.stdout)["running"] if out.returncode == 0 and out.stdout.strip() else 0

        _wait(running, 60, "a trial running")
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        _wait(lambda: not any(alive(p) for p in workers), 30, f"workers {workers} gone after their parent's SIGKILL")
        status = subprocess.run([sys.executable, "-m", "archon_server", "search", "status", str(cfg), "--storage", url],
                                cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60, check=True)
        s = json.loads(status.stdout)
        assert s["running"] == 0 and s["stale"] == 0, s  # handed back as on Ctrl-C, not left to go stale
        assert s["evaluated"] < 40, s  # they stopped: the study was not run to its end unwatched
    finally:
        for p in workers or descendants(parent.pid):
            if alive(p):
                os.kill(p, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
