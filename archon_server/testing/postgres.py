"""A throwaway PostgreSQL cluster for tests, CI and benchmarks: its own data dir, a free port on 127.0.0.1.

Debian's ``postgresql`` package provides the server binaries (``initdb``, ``pg_ctl``); this
module runs them, so tests exercise real PostgreSQL, never a stand-in.  PostgreSQL refuses to
run as root, and CI runs as root: then every server command runs as the unprivileged
``postgres`` user (``runuser``), which owns the data dir.

Used three ways:

* ``python -m archon_server.testing.postgres start DIR`` prints the URL (``.ci/run`` exports it as
  ``ARCHON_TEST_POSTGRES_URL``) and ``... stop DIR`` stops it;
* :class:`TempPostgres` as a context manager (the pytest fixture when no URL is exported, and
  ``benchmarks/search_scale.py``);
* :func:`create_database` gives each test a fresh database on the shared cluster.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from archon_server.testing.upstream import free_port

URL_ENV = "ARCHON_TEST_POSTGRES_URL"
SUPERUSER = "archon"
DRIVER = "postgresql+psycopg"  # psycopg v3 (the ``postgres`` extra); SQLAlchemy's bare postgresql:// means psycopg2


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine (install Debian's ``postgresql``)."""


def bin_dir() -> Path:
    """Folder with ``initdb``/``pg_ctl``: ``$PG_BIN``, else ``pg_config --bindir``, else Debian's newest version."""
    candidates: list[str] = []
    if os.environ.get("PG_BIN"):
        candidates.append(os.environ["PG_BIN"])
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    # Debian keeps the server binaries out of PATH, one folder per major version.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).resolve().parent))  # type: ignore[arg-type]
    for c in candidates:
        if (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise PostgresUnavailable("PostgreSQL server binaries not found: apt-get install postgresql (or set PG_BIN)")


def _run_as() -> list[str]:
    """Prefix that drops root to the ``postgres`` user (PostgreSQL will not run as root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError as e:
        raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server as") from e
    return ["runuser", "-u", "postgres", "--"]


def url_with_database(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


class TempPostgres:
    """One cluster under ``root`` (a new temp dir by default), started on a free port; ``stop()`` removes nothing
    but the server process unless the dir was ours."""

    def __init__(self, root: str | Path | None = None, port: int | None = None):
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="archon-pg-"))
        self.data = self.root / "data"
        self.port = port or free_port()
        self.bin = bin_dir()
        self.url = f"{DRIVER}://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        return [*_run_as(), *args]

    def start(self) -> TempPostgres:
        self.root.mkdir(parents=True, exist_ok=True)
        if _run_as():
            # The postgres user writes the cluster here (its parents must be traversable: /tmp is).
            os.chmod(self.root, 0o777)
        if not (self.data / "PG_VERSION").exists():
            res = subprocess.run(self._cmd(str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                                           "-E", "UTF8", "--locale=C"), capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"initdb failed: {res.stdout}{res.stderr}")
        # A unix socket in the cluster's own dir (never the system's /var/run), TCP on loopback only;
        # fsync off: a test cluster trades crash safety for speed.
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        res = subprocess.run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                                       "-o", opts, "-w", "-t", "60", "start"), capture_output=True, text=True, check=False)
        if res.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {res.stdout}{res.stderr}\n{log[-2000:]}")
        (self.root / "url").write_text(self.url)
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"),
                           capture_output=True, text=True, check=False)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_database(url: str, name: str | None = None) -> str:
    """A fresh database on the cluster at ``url``; returns its URL (each test gets its own, so nothing leaks)."""
    import psycopg

    name = name or f"t_{uuid.uuid4().hex[:12]}"
    plain = url.replace(DRIVER + "://", "postgresql://", 1)
    with psycopg.connect(plain, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    return url_with_database(url, name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m archon_server.testing.postgres", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("dir", help="cluster folder (created on start)")
    args = p.parse_args(argv)
    root = Path(args.dir).resolve()
    if args.action == "start":
        pg = TempPostgres(root).start()
        print(pg.url)
    else:
        url_file = root / "url"
        if url_file.exists():
            pg = TempPostgres(root, port=int(url_file.read_text().rsplit(":", 1)[1].split("/")[0]))
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
