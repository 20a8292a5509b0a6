from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from archon_server.config import PRESET_ALIASES, ServerConfig
from archon_server.testing.server import ServerThread
from archon_server.testing.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ARCHON_DATA_DIR", str(ROOT.parent / "shared" / "data"))


@pytest.fixture
def upstream_factory() -> Iterator[Callable[..., FakeUpstream]]:
    started: list[FakeUpstream] = []

    def make(script=None, **kw) -> FakeUpstream:  # type: ignore[no-untyped-def]
        up = FakeUpstream(script, **kw).start()
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop()


def fake_config(url: str | list[str], **server) -> ServerConfig:  # type: ignore[no-untyped-def]
    """Every preset alias bound to the fake upstream(s)."""
    urls = [url] if isinstance(url, str) else url
    return ServerConfig.model_validate(
        {
            "backends": [{"alias": "fake", "kind": "openai", "model": "fake-model", "urls": urls, "aliases": PRESET_ALIASES,
                          "max_retries": 1, "read_timeout_s": 5}],
            "architectures_dirs": [str(ROOT / "architectures")],
            "server": {"request_timeout_s": 20, **server},
        }
    )


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerThread]]:
    from archon_server.api.app import build_app

    started: list[ServerThread] = []

    def make(config: ServerConfig) -> ServerThread:
        s = ServerThread(build_app(config)).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


# -- real components a test needs (vLLM, PostgreSQL, Chromium...) ---------------------------------------------------
def under_ci() -> bool:
    """`.ci/run` (and CI services) set CI=true: then a missing component is a failure, never a skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_component(what: str, why_missing: str | None) -> None:
    """Call where a test needs a real component: nothing when it is there; else skip with the reason on a
    developer's machine and fail under CI, so a broken install cannot hide behind skipped tests."""
    if why_missing is None:
        return
    if under_ci():
        pytest.fail(f"{what} is required under CI (CI={os.environ.get('CI')}): {why_missing}", pytrace=False)
    pytest.skip(why_missing)


def needs(what: str, why_missing: str | None) -> pytest.MarkDecorator:
    """``pytestmark = [needs("vLLM", vllm_missing())]``: :func:`require_component` before each test's fixtures."""
    return pytest.mark.needs_component(what=what, why_missing=why_missing)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_component(what, why_missing): a real component the test needs (see conftest.needs)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_component"):
        require_component(mark.kwargs["what"], mark.kwargs["why_missing"])


# -- storage: SQLite and real PostgreSQL ----------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_backend() -> Iterator[object]:
    """A LocalBackend on an engine of its own (the default SmolLM2), shared by one test module: loading takes
    seconds, and a module may retune its engine (prefix budget, chunk sizes) without touching another's."""
    from archon_server.backends.local import LocalBackend
    from archon_server.engine.loader import load_engine

    engine, loaded = load_engine(progress=False)
    b = LocalBackend(progress=False)
    b.engine, b.loaded = engine, loaded
    yield b
    engine.shutdown()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[str]:
    """URL of a real PostgreSQL cluster: the one ``.ci/run`` started (``ARCHON_TEST_POSTGRES_URL``), else a
    throwaway one started here.  Under CI a missing PostgreSQL is a failure, never a skip."""
    from archon_server.testing.postgres import (
        URL_ENV,
        PostgresUnavailable,
        TempPostgres,
    )

    if os.environ.get(URL_ENV):
        yield os.environ[URL_ENV]
        return
    try:
        pg = TempPostgres().start()
    except PostgresUnavailable as e:
        require_component("PostgreSQL", str(e))
    try:
        yield pg.url
    finally:
        pg.stop()


@pytest.fixture
def postgres_url(postgres_cluster: str) -> str:
    """A fresh database of its own on the real cluster."""
    from archon_server.testing.postgres import create_database

    return create_database(postgres_cluster)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each storage test runs on SQLite and on real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/study.db"
    return request.getfixturevalue("postgres_url")
