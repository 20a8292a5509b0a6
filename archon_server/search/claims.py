"""Claim rows: at most one trial of a study evaluates a given graph at a time, across workers and hosts.

Two workers can sample the same architecture at the same moment.  Looking for a running
twin in the trial list is check-then-act (both may look before either has written its
graph key), so the decision is made by the database instead: the first ``INSERT`` of
``(study, graph key)`` into ``archon_graph_claims`` wins (primary key), the others read
who holds it and wait for that trial's result.  If the holder's trial failed (its worker
died and the heartbeat check marked it FAIL), a waiter takes the claim over with a
compare-and-swap ``UPDATE ... WHERE trial_number = <old holder>``, so exactly one
re-evaluates.  ``archon_retry_claims`` does the same for enqueuing the retry of a failed trial.
The tables live in the study's own database (SQLite or PostgreSQL): the storage URL stays the
only thing workers share.
"""

from __future__ import annotations

import time

import optuna
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from archon_server.db import create_tables

_META = sa.MetaData()
CLAIMS = sa.Table(
    "archon_graph_claims",
    _META,
    sa.Column("study_id", sa.Integer, primary_key=True),
    sa.Column("arch_key", sa.String(128), primary_key=True),
    sa.Column("trial_number", sa.Integer, nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=False),
)
# The retry of a failed trial: which worker enqueues it (see claim_retry).
RETRIES = sa.Table(
    "archon_retry_claims",
    _META,
    sa.Column("study_id", sa.Integer, primary_key=True),
    sa.Column("trial_number", sa.Integer, primary_key=True),  # the failed trial
    sa.Column("claimed_at", sa.Float, nullable=False),
)
_READY: set[int] = set()  # engines whose table exists (id() of the engine), to skip create_all per call


def storage_engine(storage: optuna.storages.BaseStorage) -> Engine | None:
    """The SQLAlchemy engine behind an RDB storage (a study wraps it in Optuna's cache); None for in-memory storage."""
    backend = getattr(storage, "_backend", storage)
    return getattr(backend, "engine", None)


def ensure_table(engine: Engine) -> Engine:
    """Create the claims table once per engine (racing workers are fine)."""
    if id(engine) not in _READY:
        create_tables(_META, engine)
        _READY.add(id(engine))
    return engine


def claim(engine: Engine, study_id: int, key: str, trial_number: int) -> int:
    """Claim ``key`` for ``trial_number``; returns the number of the trial that holds it (ours if we won)."""
    ensure_table(engine)
    try:
        with engine.begin() as con:
            con.execute(CLAIMS.insert().values(study_id=study_id, arch_key=key, trial_number=trial_number,
                                               claimed_at=time.time()))
        return trial_number
    except sa.exc.IntegrityError:
        pass
    with engine.connect() as con:
        holder = con.execute(sa.select(CLAIMS.c.trial_number).where(
            CLAIMS.c.study_id == study_id, CLAIMS.c.arch_key == key)).scalar_one_or_none()
    # Vanishes only if the row was deleted by hand; then try again from the start.
    return claim(engine, study_id, key, trial_number) if holder is None else int(holder)


def take_over(engine: Engine, study_id: int, key: str, old_holder: int, trial_number: int) -> bool:
    """Move the claim from a failed trial to ours; True for exactly one of several racing waiters."""
    with engine.begin() as con:
        res = con.execute(CLAIMS.update().where(
            CLAIMS.c.study_id == study_id, CLAIMS.c.arch_key == key, CLAIMS.c.trial_number == old_holder,
        ).values(trial_number=trial_number, claimed_at=time.time()))
    return res.rowcount == 1


def claim_retry(engine: Engine, study_id: int, trial_number: int, stale_s: float) -> bool:
    """True for the one worker that is to enqueue the retry of failed trial ``trial_number``.

    Every path that enqueues a retry claims first, so two workers that both see a trial fail (one reaping it, one
    finding it failed without a retry) enqueue it once.  A claim older than ``stale_s`` is taken over (compare and
    swap on its time): its holder died between claiming and enqueuing, which only the finder of a retry-less
    failure asks about.
    """
    ensure_table(engine)
    now = time.time()
    try:
        with engine.begin() as con:
            con.execute(RETRIES.insert().values(study_id=study_id, trial_number=trial_number, claimed_at=now))
        return True
    except sa.exc.IntegrityError:
        pass
    with engine.begin() as con:
        res = con.execute(RETRIES.update().where(
            RETRIES.c.study_id == study_id, RETRIES.c.trial_number == trial_number, RETRIES.c.claimed_at < now - stale_s,
        ).values(claimed_at=now))
    return res.rowcount == 1


def holders(engine: Engine, study_id: int) -> dict[str, int]:
    """Graph key -> claiming trial number (for reports and tests)."""
    ensure_table(engine)
    with engine.connect() as con:
        rows = con.execute(sa.select(CLAIMS.c.arch_key, CLAIMS.c.trial_number).where(CLAIMS.c.study_id == study_id))
        return {k: int(n) for k, n in rows}
