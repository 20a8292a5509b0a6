"""archon_server/db.py: the one retry loop for workers racing to create the same thing, and its three users."""

from __future__ import annotations

import functools
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from archon_server import db
from archon_server.search import runner, storage


def _raced() -> sa.exc.IntegrityError:
    return sa.exc.IntegrityError("CREATE TABLE studies", {}, Exception("duplicate key value violates unique constraint"))


def test_retry_race_tries_again_until_it_succeeds_or_the_winner_made_it() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _raced()
        return "made"

    assert db.retry_race(flaky, delay_s=0) == "made" and len(calls) == 3
    # the winner made it: no more tries, nothing returned
    calls.clear()
    assert db.retry_race(flaky, settled=lambda e: True, delay_s=0) is None and len(calls) == 1
    # a failure no retry helps (settled raises) ends it at once
    calls.clear()

    def unreachable(e: sa.exc.SQLAlchemyError) -> bool:
        raise sa.exc.OperationalError("connect", {}, Exception("connection refused"))

    with pytest.raises(sa.exc.OperationalError):
        db.retry_race(flaky, settled=unreachable, delay_s=0)
    assert len(calls) == 1
    # every try lost: the last error is raised
    tries = 0

    def always() -> None:
        nonlocal tries
        tries += 1
        raise _raced()

    with pytest.raises(sa.exc.IntegrityError):
        db.retry_race(always, attempts=4, delay_s=0)
    assert tries == 4
    # other errors are not retried
    n = 0

    def broken() -> None:
        nonlocal n
        n += 1
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        db.retry_race(broken, delay_s=0)
    assert n == 1


def test_create_tables_is_done_when_the_tables_exist(tmp_path: Path) -> None:
    meta = sa.MetaData()
    sa.Table("t", meta, sa.Column("id", sa.Integer, primary_key=True))
    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    meta.create_all(engine)
    real = meta.create_all
    tries = 0

    def lost(*a: object, **k: object) -> None:  # another worker created them first: our CREATE fails
        nonlocal tries
        tries += 1
        raise _raced()

    meta.create_all = lost  # type: ignore[method-assign]
    try:
        db.create_tables(meta, engine)
    finally:
        meta.create_all = real  # type: ignore[method-assign]
    assert tries == 1  # one try: the tables are there


def test_the_search_storage_and_study_open_through_retry_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna's schema (make_storage) and the study row (open_study) retry by the same loop as create_tables."""
    from archon_server.search.config import load_search_config
    from test_search_workers import _config

    used: list[str] = []

    def spy(fn, **kw):  # type: ignore[no-untyped-def]
        used.append(kw.get("what", "?"))
        return db.retry_race(fn, **{**kw, "delay_s": 0})

    monkeypatch.setattr(storage, "retry_race", spy)
    monkeypatch.setattr(runner, "retry_race", spy)
    real_init, real_create = storage.RDBStorage.__init__, optuna.create_study
    lost = {"schema": 1, "study": 2}

    @functools.wraps(real_init)  # make_storage reads its signature
    def rdb_init(self: object, *a: object, **k: object) -> None:
        if lost["schema"]:
            lost["schema"] -= 1
            raise _raced()
        real_init(self, *a, **k)

    def create(*a: object, **k: object) -> optuna.Study:
        if lost["study"]:
            lost["study"] -= 1
            raise _raced()
        return real_create(*a, **k)

    monkeypatch.setattr(storage.RDBStorage, "__init__", rdb_init)
    monkeypatch.setattr(optuna, "create_study", create)
    study = runner.open_study(load_search_config(_config(tmp_path)), storage=f"sqlite:///{tmp_path}/s.db")
    assert study.study_name == "shared" and lost == {"schema": 0, "study": 0}
    assert used == ["creating the study schema", "creating the study"]
