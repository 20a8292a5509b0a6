"""Database plumbing shared by the search storage (Optuna RDB) and the sweep store: URLs and table creation.

A leaf: bench and search both use it, and it imports neither.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .exceptions import ArchonError

log = logging.getLogger("archon.db")

T = TypeVar("T")


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; use psycopg v3 (the ``postgres`` extra) when that is what is installed."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    v3_only = importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None
    if url.startswith("postgresql://") and v3_only:
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def sqlite_path(url: str) -> Path | None:
    """File path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL (None for other URLs / memory)."""
    if not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///"):]
    if not rest or rest == ":memory:":
        return None
    return Path(rest.split("?", 1)[0])


def retry_race(fn: Callable[[], T], *, settled: Callable[[sa.exc.SQLAlchemyError], bool] | None = None,
               attempts: int = 5, delay_s: float = 0.2, what: str = "creating it") -> T | None:
    """The one retry loop for workers that start together and race to create the same thing (tables, Optuna's
    schema, a study row): PostgreSQL fails the losers (a unique violation in the catalogue), which try again.

    ``fn`` is called up to ``attempts`` times while it raises :class:`sqlalchemy.exc.SQLAlchemyError`, sleeping
    ``delay_s`` × the attempt number in between; the last failure is raised.  After each failure ``settled(error)``
    (when given) says whether the winner already made what ``fn`` makes (then None is returned), or raises at once
    for an error no retry can help (a database that cannot be reached)."""
    for attempt in range(attempts):
        try:
            return fn()
        except sa.exc.SQLAlchemyError as e:
            if settled is not None and settled(e):
                return None
            if attempt == attempts - 1:
                raise
            log.debug("%s raced another worker (%s); trying again (try %d)", what, type(e).__name__, attempt + 2)
            time.sleep(delay_s * (attempt + 1))
    raise AssertionError("unreachable")  # attempts >= 1: the loop returned or raised


def create_tables(metadata: sa.MetaData, engine: Engine) -> None:
    """``create_all`` that tolerates workers starting together: the loser of two concurrent CREATE TABLEs fails,
    which is fine once the tables exist (:func:`retry_race`)."""

    def exist(_: sa.exc.SQLAlchemyError) -> bool:
        inspector = sa.inspect(engine)
        return all(inspector.has_table(t) for t in metadata.tables)

    retry_race(lambda: metadata.create_all(engine), settled=exist, what="creating the tables")


def worker_id() -> str:
    """Who holds a claim or lease, as recorded in the shared database: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def redacted(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL has no password field we could find
        return url.split("@")[-1]


class DatabaseURLError(ArchonError, ValueError):
    """A database URL (``--storage``, ``--store``) that names no database this machine can open: not a URL, an
    unknown kind of database, or one whose driver is not installed. Its message is the CLI's one line."""


def check_url(url: str) -> None:
    """Raise :class:`DatabaseURLError` for a URL SQLAlchemy cannot even start on (before anything is created):
    SQLAlchemy's own ArgumentError / NoSuchModuleError / ImportError were tracebacks at the command line."""
    examples = "sqlite:///FILE, postgresql://USER@HOST/DB"
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        why = f"not a database URL ({examples})"
    else:
        try:
            dialect = parsed.get_dialect()
        except sa.exc.NoSuchModuleError:
            why = f"unknown kind of database {parsed.drivername!r} ({examples})"
        else:
            try:
                dialect.import_dbapi()
            except ImportError as e:
                why = f"the {dialect.name} driver {dialect.driver!r} is not installed ({e})"
            else:
                return
    raise DatabaseURLError(f"error: cannot open the database {redacted(url)}: {why}")


def unreachable_message(url: str, e: sa.exc.OperationalError) -> str:
    """One line for the CLI when the database cannot be opened (no traceback, no password)."""
    reason = str(e.orig if e.orig is not None else e).strip().splitlines()
    return f"error: cannot open the database {redacted(url)}: {reason[0] if reason else type(e).__name__}"
