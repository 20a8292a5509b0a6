"""The sandbox contains hostile programs: each ends in a recorded failure within its limits."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
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


# -- what the program can see of the host ----------------------------------------------------------------------------

_LOOK = """
import json, os, sys
out = dict()
for name, path in {paths!r}.items():
    try:
        if os.path.isdir(path) or name.startswith("list"):
            out[name] = sorted(os.listdir(path))[:5]
        else:
            out[name] = open(path).read()[:20]
    except OSError as e:
        out[name] = type(e).__name__
print(json.dumps(out))
"""


def _host_paths() -> dict[str, str]:
    return {"read /etc/passwd": "/etc/passwd", "read /etc/hostname": "/etc/hostname", "list project": str(REPO),
            "read project file": str(REPO / "README.md"), "list project parent": str(REPO.parent),
            "list home": str(Path.home()), "list /home": "/home", "list /etc": "/etc", "list /usr": "/usr",
            "list /var": "/var", "read own launcher": str(Path(sb.__file__).with_name("_launcher.py"))}


def _host_leaks(seen: dict) -> dict:
    """What the probe saw of the host: every path must fail (not there, or not listable) -- except that a checkout
    directly under /tmp (``mktemp -d``) has /tmp for its "project parent", and inside the sandbox /tmp is the
    sandbox's own (its throwaway ``work``); a listing there leaks only if it holds an entry of the host's."""
    paths = _host_paths()
    leaks = {}
    for what, v in seen.items():
        if v in ("FileNotFoundError", "PermissionError"):
            continue
        if what == "list project parent" and paths[what] == "/tmp" and set(v).isdisjoint(os.listdir("/tmp")):
            continue
        leaks[what] = v
    return leaks


def test_the_host_is_invisible(mode):
    import json

    paths = _host_paths()
    assert os.path.exists("/etc/passwd") and REPO.is_dir()  # they are there, on the host
    r = sb.run_python(_LOOK.format(paths=paths))
    assert r.status == "ok", r
    seen = json.loads(r.stdout)
    if mode == "namespaces":
        # Every one fails: not there at all, or (directories on the way to the Python installation) not listable.
        assert not _host_leaks(seen), seen
        assert seen["read /etc/passwd"] == "FileNotFoundError" and seen["list project"] == "FileNotFoundError"
    else:
        # What the rlimits fallback documents it cannot hide: the host's files, read with the program's uid.
        assert seen["read /etc/passwd"].startswith("root:"), seen


def test_root_holds_only_the_sandbox(mode):
    if mode != "namespaces":
        pytest.skip("rlimits mode shows the host's root (documented)")
    r = sb.run_python("import os\nprint(sorted(os.listdir('/')))\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('/dev')))\n"
                      "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))")
    assert r.status == "ok", r
    top, rest, procs = r.stdout.strip().splitlines()
    assert set(eval(top)) <= {"usr", "lib", "lib64", "lib32", "libx32", "bin", "etc", "dev", "proc", "tmp", "opt", "root", "home", "srv", "nix"}
    assert "work" not in eval(top) and "var" not in eval(top)
    assert rest.startswith("['work']")
    assert eval(procs) == ["1", "2"]  # init and the program: no host process is visible


def test_stdlib_and_the_interpreters_packages_still_work(mode):
    """The stdlib (C extensions included), subprocesses of the interpreter, multiprocessing (needs /dev/shm), and
    the packages installed for the sandbox's interpreter import as on the host."""
    import json

    python = sb._program_python(mode)
    candidates = ["yaml", "numpy", "certifi", "attr", "six", "idna", "packaging", "setuptools", "pip"]
    find = "import importlib.util, json, sys\nprint(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m)]))"
    host = subprocess.run([python, "-I", "-c", find, *candidates], capture_output=True, text=True, check=True)
    installed = json.loads(host.stdout)
    code = (
        "import json, sqlite3, decimal, ctypes, zlib, hashlib, ssl, lzma, bz2, unicodedata, subprocess, sys, multiprocessing\n"
        "import importlib\n"
        f"mods = {installed!r}\n"
        "for m in mods:\n    importlib.import_module(m)\n"
        "out = subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True).stdout.strip()\n"
        "with multiprocessing.Pool(2) as pool:\n    squares = pool.map(abs, [-3, -4])\n"
        "con = sqlite3.connect(':memory:'); con.execute('create table t(x)')\n"
        "print(out, squares, hashlib.sha256(b'x').hexdigest()[:8], len(mods))\n"
    )
    r = sb.run_python(code, limits=sb.SandboxLimits(timeout_s=30))
    assert r.status == "ok", r
    assert r.stdout.split() == ["42", "[3,", "4]", "2d711642", str(len(installed))], r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the probe as another user")
def test_unprivileged_user_namespace_hides_the_host_too():
    """Not root: the sandbox makes a user namespace of its own and hides the host just the same (where the kernel
    allows unprivileged user namespaces; otherwise it falls back to rlimits and says so)."""
    import json

    script = ("import json, sys\nsys.path.insert(0, sys.argv[1])\nfrom archon_server.sandbox import core\n"
              f"r = core.run_python({_LOOK.format(paths=_host_paths())!r})\n"
              "print(json.dumps({'mode': core.isolation_mode(), 'status': r.status, 'stdout': r.stdout, 'stderr': r.stderr}))\n")
    python = sb._program_python("namespaces")  # an interpreter "others" may run

    def as_nobody() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    # The probe imports the sandbox package from a copy that "nobody" can read: the checkout itself may not be
    # (`mktemp -d` makes a 0700 directory), and the package needs nothing of the rest of archon_server.
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        pkg = Path(tmp) / "archon_server"
        shutil.copytree(REPO / "archon_server" / "sandbox", pkg / "sandbox", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "archon_server" / "__init__.py", pkg / "__init__.py")
        p = subprocess.run([python, "-I", "-c", script, tmp], capture_output=True, text=True, cwd="/", timeout=120,
                           preexec_fn=as_nobody, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if out["mode"] != "namespaces":
        assert "cannot hide" in p.stderr  # the fallback is announced
        pytest.skip(f"this kernel refuses unprivileged user namespaces: {p.stderr[-300:]}")
    assert out["status"] == "ok", out
    seen = json.loads(out["stdout"])
    assert not _host_leaks(seen), seen
