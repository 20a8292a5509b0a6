"""A researcher's walk through README's `archon search` / `archon bench --store` (round 39): a storage URL that names
no database this machine can open -- a misspelt scheme (``foo://``), no URL at all, a database whose driver is not
installed (``mysql://`` without MySQLdb) -- was SQLAlchemy's traceback (NoSuchModuleError, ArgumentError,
ModuleNotFoundError), exit 1. README: a database that cannot be opened is one line, exit 2, and creates nothing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from archon_server.cli import main
from archon_server.db import DatabaseURLError, check_url

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search" / "tiny-scripted.yaml"

BAD = [
    ("foo://x", "error: cannot open the database foo://x: unknown kind of database 'foo' (sqlite:///FILE, "
                "postgresql://USER@HOST/DB)"),
    ("notaurl", "error: cannot open the database notaurl: not a database URL (sqlite:///FILE, postgresql://USER@HOST/DB)"),
]


def _archon(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # this checkout's
    return subprocess.run([sys.executable, "-m", "archon_server", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize("command", ["run", "status", "export"])
@pytest.mark.parametrize("url, line", BAD)
def test_search_with_a_storage_url_that_names_no_database_is_one_line(tmp_path: Path, command: str, url: str, line: str) -> None:
    out = _archon("search", command, str(TINY), "--storage", url, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines() == [line], out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url, line", BAD)
def test_bench_with_a_store_url_that_names_no_database_is_one_line(tmp_path, capsys, url, line) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text("architectures: [null-model]\nbenchmarks: [{name: math500, n: 2}]\n")
    out = tmp_path / "out"
    assert main(["bench", "run", str(sweep), "--out", str(out), "--store", url, "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines() == [line]
    assert main(["bench", "report", str(out), "--store", url, "--sweep", "s"]) == 2
    assert capsys.readouterr().err.splitlines() == [line]
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("pymysql") is not None, reason="pymysql is installed here")
def test_a_database_whose_driver_is_not_installed_is_named_with_the_driver() -> None:
    with pytest.raises(DatabaseURLError) as e:
        check_url("mysql+pymysql://user:secret@db/archon")
    assert str(e.value) == ("error: cannot open the database mysql+pymysql://user:***@db/archon: the mysql driver "
                            "'pymysql' is not installed (No module named 'pymysql')")


def test_urls_of_installed_databases_pass(tmp_path: Path) -> None:
    check_url(f"sqlite:///{tmp_path}/x.db")
    check_url("sqlite:///:memory:")
