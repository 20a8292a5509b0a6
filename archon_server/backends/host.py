"""The backend host: one process that runs a config's in-process backends for every ``archon serve --workers N`` worker.

``python -m archon_server.backends.host -c CONFIG --socket PATH`` builds the config's backends of the in-process kinds
(the embedded engine, managed vLLM), starts them once and serves them on ``PATH`` (``backends/shared.py`` has the
protocol). :class:`BackendHostProcess` is the serving parent's handle on it: started before the workers, restarted
when it dies (the workers' calls in flight fail with a retryable 503, later calls wait for the new one), stopped
after them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from ..config import load_config
from ..exceptions import ArchonError
from ..spec import SpecError
from .process import reap, spawn
from .registry import hosted_backends
from .shared import BackendHost

log = logging.getLogger("archon.backends.host")


class BackendHostFailed(ArchonError):
    """The backend host exited before it listened (its own error is on stderr already)."""


class BackendHostProcess:
    """The host process of one serving parent. ``socket`` is known at construction (the workers' registries are
    built with it); :meth:`start` launches the host and waits until it listens; a watchdog thread restarts it when
    it exits while the server runs (after 1 s, doubling to 30 s while it keeps dying young)."""

    def __init__(self, config_path: str | None, env: dict[str, str] | None = None):
        self.config_path = config_path
        self.env = env  # the host's environment (default: this process's, as it is at each start)
        self.dir = tempfile.mkdtemp(prefix="archon-backends-")  # 0700: only this user may connect (the wire is pickle)
        self.socket = os.path.join(self.dir, "backends.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watchdog: threading.Thread | None = None

    def _launch(self) -> None:
        argv = [sys.executable, "-m", "archon_server.backends.host", "--socket", self.socket]
        if self.config_path:
            argv += ["-c", self.config_path]
        self.proc = spawn(argv, env=self.env)
        self.started_at = time.monotonic()

    def start(self, timeout_s: float = 120.0) -> None:
        self._launch()
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                reap(self.proc)
                raise BackendHostFailed(f"the backend host exited with status {self.proc.returncode} before it listened")
            if time.monotonic() > deadline:
                self.stop()
                raise BackendHostFailed(f"the backend host did not listen on {self.socket} within {timeout_s:.0f} s")
            time.sleep(0.05)
        self._watchdog = threading.Thread(target=self._watch, name="backend host watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        backoff = 1.0
        while True:
            proc = self.proc
            assert proc is not None
            rc = proc.wait()
            reap(proc)
            if self._stopping.is_set():
                return
            lived = time.monotonic() - self.started_at
            backoff = 1.0 if lived > 60 else min(backoff * 2, 30.0)
            log.error("the backend host (pid %d) exited with status %s after %.0f s; restarting it in %.0f s",
                      proc.pid, rc, lived, backoff)
            if self._stopping.wait(backoff):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.socket)
                self._launch()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the host (it closes its backends), SIGKILL after ``grace_s``; idempotent."""
        self._stopping.set()
        with self._lock:
            proc = self.proc
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc is not None:
                reap(proc)
        shutil.rmtree(self.dir, ignore_errors=True)


async def _serve(host: BackendHost, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by a host that died
    await host.serve(path)
    print(f"backend host (pid {os.getpid()}): serving {', '.join(host.backends)} on {path}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await host.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m archon_server.backends.host", description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", help="the server's config (default: the built-in one)")
    ap.add_argument("--socket", required=True, help="Unix socket to serve the backends on")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="backend-host %(levelname)s %(name)s: %(message)s")
    try:
        backends = hosted_backends(load_config(args.config))
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not backends:
        print("error: the config has no in-process backends to host", file=sys.stderr)
        return 2
    asyncio.run(_serve(BackendHost(backends), args.socket))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
