"""Run untrusted Python code (model-written solutions, unit tests) in a separate, limited process.

Two isolation modes, chosen once per process by :func:`isolation_mode` (override with
``ARCHON_SANDBOX_MODE=namespaces|rlimits``):

``namespaces`` (the preferred mode: as root, or in an unprivileged user namespace where the kernel allows one)
    * network: a fresh network namespace with only a downed loopback — no connection
      to anything, 127.0.0.1 included;
    * filesystem: the program sees none of the host's files. Its root is a small read-only
      tmpfs holding only read-only bind mounts of what its Python needs (:func:`python_view`:
      the interpreter, the standard library, the interpreter's own site-packages, the
      shared libraries it loads, the dynamic loader), directories on the way to them are
      traverse-only (listing /usr or /etc fails), plus a fresh size-limited /tmp with the
      working directory /tmp/work (also HOME and TMPDIR) that vanishes with the run, a
      minimal /dev (null, zero, full, random, urandom, a tmpfs /dev/shm) and the /proc of
      the new PID namespace (its own processes only). No /etc/passwd, no project directory,
      no home directory; the host's root is detached from the namespace (pivot_root);
    * processes: a fresh PID namespace (its init is killed with the run, taking every
      descendant with it); as root a fresh unprivileged uid per run, so RLIMIT_NPROC really
      bounds forks (Linux never enforces it for root); in a user namespace the caller's own
      uid without capabilities (RLIMIT_NPROC is then the caller's process count plus the
      allowance); no_new_privs either way;
    * rlimits: CPU seconds, address space, file size, open files, no core dumps.
``rlimits`` (fallback: namespaces refused; a warning is logged)
    rlimits as above (as root the program still runs under a fresh uid so RLIMIT_NPROC
    holds; otherwise RLIMIT_NPROC counts the caller's own processes too and is set to
    the current count plus the allowance), a throwaway temp working directory, and an
    audit hook in the program's interpreter that refuses socket creation and
    connection.  What it cannot hide or stop: the program can READ every file its uid
    may read (/etc/passwd, world-readable files of the project and of home directories),
    list every directory, and see every process in /proc; a subprocess started by the
    program is not covered by the network hook; files writable by the caller outside the
    working directory remain writable.

Both: a new session/process group killed as a whole at the wall-clock deadline, output
capped (the run is killed when a stream exceeds it), minimal environment, stdin from a
file.  Results are records, never exceptions.
"""

from __future__ import annotations

import asyncio
import functools
import glob
import itertools
import json
import logging
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "failed", "timeout", "memory", "error"]

log = logging.getLogger("archon.sandbox")

_LAUNCHER = Path(__file__).with_name("_launcher.py")
_UID_BASE = 1_600_000_000  # far above any uid a distribution hands out
_uid_counter = itertools.count()
_mode_lock = threading.Lock()
_mode: str | None = None


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock for the whole run
    cpu_s: int | None = None  # RLIMIT_CPU; default: ceil(timeout_s)
    memory_mb: int = 1024  # RLIMIT_AS of the program
    output_bytes: int = 1_000_000  # per stream; exceeding it kills the run
    file_mb: int = 16  # RLIMIT_FSIZE
    nproc: int = 32  # processes the program may have at once (itself included)
    max_files: int = 256  # RLIMIT_NOFILE
    tmpfs_mb: int = 64  # size of each private tmpfs (namespaces mode)
    tail_chars: int = 4000  # how much of stdout/stderr the result keeps


@dataclass
class SandboxResult:
    passed: bool
    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    reason: str = ""
    isolation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- mode selection


def _world_executable(path: str) -> bool:
    """Can an unrelated unprivileged user execute ``path`` (every directory on the way o+x, file o+x)?"""
    p = Path(os.path.realpath(path))
    try:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
        for parent in p.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                return False
    except OSError:
        return False
    return True


def _program_python(mode: str) -> str:
    """The interpreter that runs the program: under a dropped uid it must be reachable by 'others'."""
    if mode != "namespaces" and os.geteuid() != 0:
        return sys.executable
    cands = [sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3", "/usr/local/bin/python3"]
    which = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if which:
        cands.append(which)
    for c in cands:
        if c and os.path.exists(c) and _world_executable(c):
            return c
    raise RuntimeError("no Python interpreter is executable by an unprivileged user")


# Run by the program's interpreter (as the caller, outside any sandbox) to learn what it needs to start: its own
# paths, and every shared library it maps once the stdlib's usual C extensions are loaded.
_VIEW_PROBE = r"""
import glob, importlib, json, os, sys, sysconfig
for m in ("_ctypes", "_decimal", "_hashlib", "_ssl", "_sqlite3", "_bz2", "_lzma", "zlib", "_uuid", "readline", "_curses",
          "pyexpat", "_multiprocessing", "_posixshmem", "mmap", "select", "_socket", "unicodedata", "_json", "math"):
    try:
        importlib.import_module(m)
    except Exception:
        pass
libs = set()
with open("/proc/self/maps") as f:
    for line in f:
        path = line.split(None, 5)[5].strip() if len(line.split(None, 5)) == 6 else ""
        if path.startswith("/") and ".so" in os.path.basename(path):
            libs.add(path)
paths = sysconfig.get_paths()
print(json.dumps({
    "executable": sys.executable,
    "prefixes": sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}),
    "stdlib": [paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)],
    "sys_path": [p for p in sys.path if p],
    "libpython": glob.glob(os.path.join(sysconfig.get_config_var("LIBDIR") or "/nonexistent", "libpython*.so*")),
    "libs": sorted(libs),
}))
"""


@functools.lru_cache(maxsize=8)
def python_view(python: str) -> tuple[str, ...]:
    """The host paths a program run by ``python`` gets to see (read-only) in namespaces mode, nothing else: the
    interpreter (and the symlinks to it), its standard library and site-packages (``sys.path`` entries inside its
    installation prefixes: an editable install's checkout, added by a .pth file, stays out), libpython, the
    directories of the shared libraries it loads, the dynamic loader and its cache."""
    probe = subprocess.run([python, "-I", "-c", _VIEW_PROBE], capture_output=True, text=True, timeout=60, cwd="/", check=True,
                           env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    prefixes = [os.path.realpath(p) for p in info["prefixes"]]

    def inside_prefix(path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == p or real.startswith(p.rstrip("/") + "/") for p in prefixes)

    view = {python, info["executable"], *info["libpython"], *info["stdlib"], "/etc/ld.so.cache"}
    view |= {p for p in info["sys_path"] if os.path.exists(p) and inside_prefix(p)}
    view |= {os.path.dirname(lib) for lib in info["libs"]}
    view |= set(glob.glob("/lib*/ld-linux*.so*")) | set(glob.glob("/lib*/ld-musl*.so*"))  # the ELF interpreter path
    for venv_cfg in (Path(python).parent / "pyvenv.cfg", Path(python).parent.parent / "pyvenv.cfg"):
        if venv_cfg.exists():
            view.add(str(venv_cfg))
    # One bind per tree: drop a path that another one's real location already contains.
    real = {p: os.path.realpath(p) for p in view if os.path.lexists(p)}
    keep = [p for p, r in real.items() if p != r or not any(o != r and r.startswith(o.rstrip("/") + "/") for o in real.values() if os.path.isdir(o))]
    return tuple(sorted(keep))


def isolation_mode() -> str:
    """``namespaces`` when a probe run inside fresh namespaces works, else ``rlimits`` (cached)."""
    global _mode
    with _mode_lock:
        if _mode is not None:
            return _mode
        forced = os.environ.get("ARCHON_SANDBOX_MODE")
        if forced in ("namespaces", "rlimits"):
            _mode = forced
            return _mode
        _mode = "rlimits"
        if sys.platform.startswith("linux"):
            # As root: plain namespaces. Otherwise an unprivileged user namespace, where the kernel allows it.
            why = ""
            try:
                probe = _run("print('sandbox-ok')", "", None, SandboxLimits(timeout_s=20), "namespaces")
                if probe.status == "ok" and probe.stdout.strip() == "sandbox-ok":
                    _mode = "namespaces"
                else:
                    why = probe.reason or probe.stderr[-300:]
            except Exception as e:  # noqa: BLE001 - any failure means: fall back
                why = f"{type(e).__name__}: {e}"
            if _mode == "rlimits":
                log.warning("sandbox: namespaces unavailable (%s); falling back to rlimits, which cannot hide the host's "
                            "files from the program", why)
        return _mode


# --------------------------------------------------------------------------- running


def _next_uid() -> int:
    return _UID_BASE + (os.getpid() % 100_000) * 1000 + next(_uid_counter) % 1000


def _processes_of_current_user() -> int:
    uid = os.getuid()
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _tail(data: bytes, n: int) -> str:
    text = data.decode("utf-8", errors="replace")
    return text[-n:] if len(text) > n else text


def _run(code: str, stdin: str, files: dict[str, str] | None, limits: SandboxLimits, mode: str) -> SandboxResult:
    cpu = limits.cpu_s if limits.cpu_s is not None else max(1, int(-(-limits.timeout_s // 1)))
    job: dict[str, Any] = {
        "mode": mode,
        "code": code,
        "stdin": stdin,
        "files": files or {},
        "python": _program_python(mode),
        "cpu_s": cpu,
        "memory_bytes": limits.memory_mb * 1024 * 1024,
        "file_bytes": limits.file_mb * 1024 * 1024,
        "max_files": limits.max_files,
        "tmpfs_mb": limits.tmpfs_mb,
    }
    workdir = None
    root = None
    if mode == "namespaces":
        root = tempfile.mkdtemp(prefix="archon-sbx-root-")  # only a mount point: the tmpfs root lives in the namespace
        job["root"] = root
        job["view"] = list(python_view(job["python"]))
        if os.geteuid() == 0:
            job["uid"] = _next_uid()
            job["nproc"] = limits.nproc
        else:  # a user namespace of our own uid: RLIMIT_NPROC counts our other processes too
            job["nproc"] = _processes_of_current_user() + limits.nproc
    else:
        workdir = tempfile.mkdtemp(prefix="archon-sbx-")
        job["workdir"] = workdir
        if os.geteuid() == 0:
            # root is exempt from RLIMIT_NPROC: run the program under a fresh uid instead
            job["uid"] = _next_uid()
            job["nproc"] = limits.nproc
        else:
            job["nproc"] = _processes_of_current_user() + limits.nproc
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_LAUNCHER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # own process group: one killpg ends everything
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            cwd="/",
            close_fds=True,
        )
    except OSError as e:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        if root:
            os.rmdir(root)
        return SandboxResult(False, "error", None, "", "", 0.0, f"cannot start sandbox: {e}", mode)
    killed: str | None = None
    out = {"stdout": bytearray(), "stderr": bytearray()}
    try:
        assert proc.stdin and proc.stdout and proc.stderr
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        deadline = t0 + limits.timeout_s
        open_streams = 2
        while open_streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed = "timeout"
                break
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                chunk = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                buf = out[key.data]
                buf += chunk
                if len(buf) > limits.output_bytes:
                    killed = "output"
                    del buf[: len(buf) - limits.output_bytes]
            if killed:
                break
        sel.close()
        if killed:
            _killpg(proc)
        try:
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()) if not killed else 5)
        except subprocess.TimeoutExpired:
            killed = killed or "timeout"
            _killpg(proc)
            rc = proc.wait()
    finally:
        _killpg(proc)  # stragglers that left the group are covered by the PID namespace (namespaces mode)
        for s in (proc.stdout, proc.stderr):
            if s:
                s.close()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        if root:
            try:
                os.rmdir(root)
            except OSError:
                pass
    dur = time.monotonic() - t0
    stdout, stderr = _tail(bytes(out["stdout"]), limits.tail_chars), _tail(bytes(out["stderr"]), limits.tail_chars)
    status, reason = _classify(rc, stderr, killed, limits)
    extra = {"uid": job["uid"]} if job.get("uid") is not None else {}
    return SandboxResult(status == "ok", status, rc, stdout, stderr, dur, reason, mode, extra)


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(rc: int | None, stderr: str, killed: str | None, limits: SandboxLimits) -> tuple[Status, str]:
    if killed == "timeout":
        return "timeout", f"wall-clock limit of {limits.timeout_s:g}s exceeded"
    if killed == "output":
        return "error", f"output limit of {limits.output_bytes} bytes exceeded"
    if rc == 125 and "SANDBOX-LAUNCHER:" in stderr:
        return "error", stderr.split("SANDBOX-LAUNCHER:", 1)[1].strip().splitlines()[0]
    if rc == 0:
        return "ok", ""
    if rc is not None and rc > 128:
        sig = rc - 128
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            # SIGXCPU at the soft CPU limit, SIGKILL at the hard one (we did not kill it ourselves)
            return "timeout", f"CPU limit exceeded (signal {signal.Signals(sig).name})"
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if "MemoryError" in stderr:
            return "memory", f"memory limit of {limits.memory_mb} MiB exceeded"
        return "failed", f"killed by signal {name}"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory", f"memory limit of {limits.memory_mb} MiB exceeded"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return "failed", f"exit status {rc}" + (f": {last}" if last else "")


def run_python(
    code: str,
    *,
    stdin: str = "",
    files: dict[str, str] | None = None,
    limits: SandboxLimits | None = None,
    timeout_s: float | None = None,
) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a fresh sandbox; ``files`` are extra files (relative paths) beside it."""
    lim = limits or SandboxLimits()
    if timeout_s is not None:
        lim = replace(lim, timeout_s=timeout_s)
    for name in files or {}:
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise ValueError(f"sandbox file names must be relative and stay inside the working directory: {name!r}")
    return _run(code, stdin, files, lim, isolation_mode())


async def arun_python(code: str, **kw: Any) -> SandboxResult:
    """Async wrapper: the blocking run happens in a worker thread."""
    return await asyncio.to_thread(run_python, code, **kw)


def run_many(
    programs: Sequence[str], *, limits: SandboxLimits | None = None, max_workers: int | None = None
) -> list[SandboxResult]:
    """Run several programs concurrently (threads waiting on processes), results in input order."""
    workers = max_workers or max(1, min(len(programs), os.cpu_count() or 1))
    isolation_mode()  # probe once, before the threads race for it
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c: run_python(c, limits=limits), programs))


def run_tests(code: str, tests: list[str] | str, timeout_s: float = 10.0, *, max_workers: int | None = None) -> list[SandboxResult]:
    """Run ``code`` followed by each test (one sandbox per test); a string is one test.

    Each test is Python source, typically ``assert`` statements; a test passes when the
    program ``code + test`` exits with status 0 within the limits.
    """
    items = [tests] if isinstance(tests, str) else list(tests)
    programs = [f"{code}\n\n{t}\n" for t in items]
    return run_many(programs, limits=SandboxLimits(timeout_s=timeout_s), max_workers=max_workers)
