"""The sandbox contains hostile programs: each ends in a recorded failure within its limits."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from archon_server.sandbox import core as sb

REPO = Path(__file__).resolve().parents[1]
MODES = ["default", "rlimits"]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    if request.param == "rlimits":
        monkeypatch.setattr(sb, "_mode", "rlimits")
    return sb.isolation_mode()


def _live_processes_of(uid: int) -> int:
    """Live (non-zombie) processes of ``uid``; killed zombies are left for init to reap."""
    out = subprocess.run(["ps", "-eo", "uid=,stat="], capture_output=True, text=True).stdout.splitlines()
    return sum(1 for line in out if int(line.split()[0]) == uid and not line.split()[1].startswith("Z"))


def test_ok_and_minimal_environment(mode, monkeypatch):
    monkeypatch.setenv("ARCHON_SECRET_TEST", "leak")
    r = sb.run_python("import os, sys\nprint(os.getcwd() == os.environ['HOME'], os.environ.get('ARCHON_SECRET_TEST'))\nprint(sys.stdin.read())",
                      stdin="hello")
    assert r.status == "ok" and r.passed, r
    assert r.stdout.split() == ["True", "None", "hello"]
    assert r.isolation == mode


def test_failure_is_recorded(mode):
    r = sb.run_python("raise SystemExit(3)")
    assert (r.status, r.returncode, r.passed) == ("failed", 3, False)
    r = sb.run_python("assert 1 == 2")
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_infinite_loop_times_out(mode):
    r = sb.run_python("while True:\n    pass", timeout_s=1.5)
    assert r.status == "timeout" and not r.passed
    assert r.duration_s < 10


def test_cpu_limit_is_enforced_before_wall_clock(mode):
    r = sb.run_python("while True:\n    pass", limits=sb.SandboxLimits(timeout_s=30, cpu_s=1))
    assert r.status == "timeout" and "CPU" in r.reason
    assert r.duration_s < 25


def test_memory_hog(mode):
    r = sb.run_python("x = bytearray(4 * 1024 ** 3)\nprint(len(x))", limits=sb.SandboxLimits(memory_mb=256))
    assert r.status == "memory", r


def test_output_flood(mode):
    r = sb.run_python("while True:\n    print('x' * 1000)", limits=sb.SandboxLimits(timeout_s=10, output_bytes=100_000))
    assert r.status == "error" and "output" in r.reason
    assert len(r.stdout) <= sb.SandboxLimits().tail_chars


def test_network_connection_to_localhost_fails(mode):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    got: list[object] = []

    def accept() -> None:
        try:
            got.append(srv.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    r = sb.run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
    t.join()
    srv.close()
    assert r.status == "failed" and "connected" not in r.stdout
    assert not got  # the listener on the host saw nothing


def test_writes_outside_workdir_do_not_reach_the_host(mode):
    name = f"archon-sbx-escape-{uuid.uuid4().hex}"
    targets = [REPO / name, Path("/tmp") / name, Path("/var/tmp") / name]
    code = "import sys\nok = []\n"
    for t in targets:
        code += f"try:\n    open({str(t)!r}, 'w').write('x')\n    ok.append({str(t)!r})\nexcept OSError as e:\n    print('blocked', e)\n"
    code += "open('inside.txt', 'w').write('fine')\nprint('wrote', ok)\n"
    try:
        r = sb.run_python(code)
        assert r.status == "ok", r
        # What is guaranteed: in namespaces mode nothing written anywhere reaches the host
        # (read-only mounts, private tmpfs on /tmp, /var/tmp).  In rlimits mode only what the
        # (dropped, when we are root) uid cannot write is protected: the repository is, the
        # world-writable /tmp is not.
        protected = targets if mode == "namespaces" else ([targets[0]] if os.geteuid() == 0 else [])
        for t in protected:
            assert not t.exists(), f"sandbox wrote {t}"
        assert str(REPO / name) not in r.stdout.split("wrote", 1)[1] or not protected
    finally:
        for t in targets[1:]:
            if mode != "namespaces" and t.exists():
                t.unlink()


def test_workdir_is_removed(mode):
    r = sb.run_python("import os\nopen('f.txt', 'w').write('x')\nprint(os.getcwd())")
    assert r.status == "ok"
    cwd = r.stdout.strip()
    if mode == "rlimits":
        assert not os.path.exists(cwd)
    else:
        assert cwd == "/tmp/work" and not os.path.exists("/tmp/work/f.txt")


def test_fork_bomb_is_contained(mode):
    # First a bounded fork loop: forks must start failing at the process limit.  Only if that
    # holds do we run a real bomb.
    bounded = (
        "import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n    n += 1\nprint(n)"
    )
    r = sb.run_python(bounded, limits=sb.SandboxLimits(timeout_s=10, nproc=16))
    assert r.status == "ok", r
    assert int(r.stdout) < 16
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = sb.run_python(bomb, limits=sb.SandboxLimits(timeout_s=2, nproc=16))
    assert r.status == "timeout"
    # nothing of it survives the run (the run's own uid: other sandboxes may be running meanwhile)
    if "uid" in r.extra:
        # SIGKILLed processes may take a moment to finish exiting on a loaded machine
        for _ in range(100):
            if _live_processes_of(r.extra["uid"]) == 0:
                break
            time.sleep(0.1)
        assert _live_processes_of(r.extra["uid"]) == 0


def test_run_tests_one_result_per_test():
    res = sb.run_tests("def inc(x):\n    return x + 1", ["assert inc(1) == 2", "assert inc(1) == 3", "import time\ntime.sleep(60)"],
                       timeout_s=2)
    assert [r.status for r in res] == ["ok", "failed", "timeout"]
    assert [r.passed for r in res] == [True, False, False]


def test_relative_file_names_only():
    with pytest.raises(ValueError):
        sb.run_python("pass", files={"../x.py": ""})
    r = sb.run_python("import helper\nprint(helper.X)", files={"helper.py": "X = 42"})
    assert r.stdout.strip() == "42"
