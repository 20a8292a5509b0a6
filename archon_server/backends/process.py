"""A supervised child process: spawn in its own session, forward its log, stop it without orphans.

Used by the managed vLLM backend, but nothing here knows about vLLM.

No-orphan strategy, in layers (each covers a way our process can end):

* the child starts in a new session (``start_new_session``), so it and everything it
  forks (vLLM's engine-core processes) share one process group we can signal at once;
* ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` in the child: the kernel signals it when the
  thread that forked it dies -- this covers SIGKILL of our process, which runs no code
  (caveat: the *thread*, so start children from a long-lived loop thread, as uvicorn's
  main-thread loop is, never from a short-lived worker thread);
* :func:`kill_all_groups` runs at ``atexit`` (normal exit, unhandled exception, SIGINT
  via KeyboardInterrupt) and from a SIGTERM handler installed only when SIGTERM still
  has its default action (we never override a handler uvicorn or the CLI installed).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("archon.backends.process")

_PR_SET_PDEATHSIG = 1

# Process-group ids of every live child we started; read by the atexit/signal hooks.
_LIVE_GROUPS: set[int] = set()
_hooks_installed = False


def _load_prctl():  # type: ignore[no-untyped-def]
    # Resolved in the parent: the preexec hook runs between fork and exec, where
    # loading a library (taking locks) is unsafe.
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except OSError:
        return None


_prctl = _load_prctl()


def _child_preexec() -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def die_with_parent(parent: int) -> None:
    """In a child we did not start with :func:`spawn` (uvicorn's ``--workers`` processes, ``archon search run
    --workers``' workers): SIGTERM when the process that started it dies, SIGKILL included, as :func:`_child_preexec`
    gives spawned children. A parent already gone before this ran (the child was re-parented) ends the child now.
    The kernel sends it once for each thread that inherited the setting: a handler must act on the first only."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS calls free right now (another process may still take it before the child binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def kill_all_groups(sig: int = signal.SIGKILL) -> None:
    for pgid in list(_LIVE_GROUPS):
        kill_group(pgid, sig)
        _LIVE_GROUPS.discard(pgid)


def _on_sigterm(signum: int, frame: object) -> None:
    kill_all_groups()
    # Then die as SIGTERM would have killed us, so our parent sees the usual status.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def install_exit_hooks() -> None:
    """Idempotent: atexit always; a SIGTERM handler only if nobody else installed one."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(kill_all_groups)
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _on_sigterm)


def spawn(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a supervised child from synchronous code: its own session (one group to signal), SIGTERM
    when the forking thread dies, and killed by the exit hooks; :func:`reap` when it is gone."""
    install_exit_hooks()
    proc = subprocess.Popen(list(argv), start_new_session=True, preexec_fn=_child_preexec, **popen)  # noqa: S603
    _LIVE_GROUPS.add(proc.pid)
    return proc


def reap(proc: subprocess.Popen[bytes]) -> None:
    """After ``proc`` (from :func:`spawn`) exited: kill what is left of its group and forget it."""
    kill_group(proc.pid)
    _LIVE_GROUPS.discard(proc.pid)


class SupervisedProcess:
    """One run of one command. Restarting means creating a new instance (state stays simple).

    Output (stdout and stderr merged) is forwarded line by line to ``logger`` with
    ``prefix`` and the last ``tail_lines`` lines are kept for error messages.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        prefix: str,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        logger: logging.Logger | None = None,
        log_level: int = logging.INFO,
        tail_lines: int = 60,
    ):
        self.argv = [str(a) for a in argv]
        self.prefix = prefix
        self.env = env
        self.cwd = cwd
        self.logger = logger or log
        self.log_level = log_level
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at: float | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def command_line(self) -> str:
        import shlex

        return shlex.join(self.argv)

    def last_lines(self, n: int = 20) -> str:
        return "\n".join(list(self.tail)[-n:])

    async def start(self) -> None:
        install_exit_hooks()
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        # Line-buffered child output so the log arrives as it happens.
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_child_preexec,
            limit=1 << 20,  # vLLM prints long config lines; the default 64 KiB would raise
        )
        self.started_at = time.monotonic()
        _LIVE_GROUPS.add(self.proc.pid)  # new session => pgid == pid
        self._reader = asyncio.create_task(self._forward(), name=f"log {self.prefix}")

    async def _forward(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            try:
                raw = await self.proc.stdout.readline()
            except ValueError:  # a line longer than the limit: keep going with what we got
                raw = await self.proc.stdout.read(1 << 16)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.tail.append(line)
                self.logger.log(self.log_level, "%s %s", self.prefix, line)

    async def _exited(self) -> int:
        # Not ``proc.wait()``: asyncio's wait() also waits for the stdout pipe to close,
        # and a forked grandchild (vLLM's engine core) holding it open would block it
        # forever. The child watcher sets ``returncode`` as soon as the leader is reaped.
        assert self.proc is not None
        while self.proc.returncode is None:
            await asyncio.sleep(0.1)
        return self.proc.returncode

    async def wait(self) -> int:
        """Wait for exit; then kill what is left of its process group (e.g. forked workers)."""
        assert self.proc is not None
        rc = await self._exited()
        kill_group(self.proc.pid)
        _LIVE_GROUPS.discard(self.proc.pid)
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 2.0)
        return rc

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; idempotent."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        if self.proc.returncode is None:
            kill_group(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self._exited(), grace_s)
            except asyncio.TimeoutError:
                self.logger.warning("%s did not stop within %.0fs of SIGTERM; sending SIGKILL", self.prefix, grace_s)
        # The leader may be gone while its children linger: always sweep the group.
        kill_group(pgid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._exited(), 5.0)
        _LIVE_GROUPS.discard(pgid)
        if self._reader is not None:
            # Read the pipe to its end (whoever held it open was just killed), cancelling only past 2 s: a pipe
            # left open made the subprocess transport close itself from __del__ after the event loop had ended
            # ("Exception ignored ... RuntimeError: Event loop is closed" at the end of benchmarks/backends.py).
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 2.0)
        return self.proc.returncode
