"""Database plumbing shared by the search storage (Optuna RDB) and the sweep store: URLs and table creation.

A leaf: bench and search both use it, and it imports neither.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine


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


def create_tables(metadata: sa.MetaData, engine: Engine) -> None:
    """``create_all`` that tolerates workers starting together: on PostgreSQL the loser of two concurrent
    CREATE TABLEs fails (a unique violation in the catalogue), which is fine once the tables exist."""
    for attempt in range(5):
        try:
            metadata.create_all(engine)
            return
        except sa.exc.SQLAlchemyError:
            inspector = sa.inspect(engine)
            if all(inspector.has_table(t) for t in metadata.tables):
                return
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def worker_id() -> str:
    """Who holds a claim or lease, as recorded in the shared database: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def redacted(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL has no password field we could find
        return url.split("@")[-1]


def unreachable_message(url: str, e: sa.exc.OperationalError) -> str:
    """One line for the CLI when the database cannot be opened (no traceback, no password)."""
    reason = str(e.orig if e.orig is not None else e).strip().splitlines()
    return f"error: cannot open the database {redacted(url)}: {reason[0] if reason else type(e).__name__}"
