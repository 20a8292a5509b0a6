"""Optuna RDB storage for searches: SQLite by default, any SQLAlchemy URL (PostgreSQL, MySQL) to share a study.

The storage *is* the coordination layer: workers on one machine or many only share
the URL.  Heartbeats let a worker notice that another one died mid-trial: its
RUNNING trial goes stale, is marked FAIL, and :class:`RetryFailedTrialCallback`
enqueues a copy (same parameters) that the next free worker picks up.
"""

from __future__ import annotations

import copy
import inspect
import logging
import sqlite3
import threading
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from archon_server.db import check_url, normalize_url, redacted, retry_race, sqlite_path
from archon_server.search import claims
from archon_server.spec import SpecError

log = logging.getLogger("archon.search.storage")


def _prepare_sqlite(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # WAL lets readers (optuna-dashboard, `search status`) work while a worker writes;
    # the mode is stored in the file, so setting it once here is enough for every engine.
    con = sqlite3.connect(str(path), timeout=60)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def _sqlite_creator(path: Path) -> Any:
    def connect() -> sqlite3.Connection:
        # check_same_thread=False: the pool may hand this connection to the heartbeat thread.
        con = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
        # With WAL, NORMAL stays consistent after a crash (a kill -9 loses at most the last commit)
        # and avoids an fsync per commit, which dominated trial time (~10x slower with FULL).
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    return connect


class ClaimedRetry:
    """Optuna's retry callback (same parameters, ``retry_history``), enqueuing each failed trial's retry once.

    Optuna's callback enqueues whenever it is called; :func:`reap_stale_trials` may call it for a trial another
    worker is reaping at the same moment, so a claim row (:func:`claims.claim_retry`) decides who enqueues.
    """

    def __init__(self, max_retry: int | None, stale_s: float):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental/deprecation notices, not actionable for users
            cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
            self._enqueue = cls(max_retry=max_retry)
        self.max_retry = max_retry
        self.stale_s = stale_s

    def exhausted(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Retried ``max_retry`` times already (Optuna's rule): no more retries."""
        return self.max_retry is not None and len(trial.system_attrs.get("retry_history", [])) >= self.max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        """Enqueue the retry unless retries are used up or another worker has claimed it; whether it did."""
        if self.exhausted(trial):
            return False
        engine = claims.storage_engine(study._storage)  # noqa: SLF001 - the study's own database
        if engine is not None and not claims.claim_retry(engine, study._study_id, trial.number, self.stale_s):  # noqa: SLF001
            return False
        self._enqueue(study, trial)
        return True


def retry_callback(max_retry: int | None, stale_s: float = 60.0) -> ClaimedRetry:
    """Re-enqueue a dead worker's trial with the same parameters (``retried_from`` finds the original)."""
    return ClaimedRetry(max_retry, stale_s)


def retried_from(trial: optuna.trial.FrozenTrial) -> int | None:
    """Number of the dead trial this one re-runs (set by the retry callback), else None.

    Optuna's retry callback keeps ``failed_trial`` at the *first* trial of a chain (a retry of a retry still names
    the original), and appends every dead predecessor to ``retry_history``; the trial this one directly re-runs is
    the last of that history.
    """
    history = trial.system_attrs.get("retry_history")
    if history:
        return int(history[-1])
    n = trial.system_attrs.get("failed_trial")
    return int(n) if n is not None else None


class StudyNotFound(SpecError, LookupError):
    """The storage holds no study of that name (the CLI prints it, exit 2)."""


def make_storage(
    url: str,
    *,
    heartbeat_interval: int | None = 10,
    grace_period: int | None = None,
    max_retry: int | None = 2,
    create: bool = True,
) -> RDBStorage:
    """Open an RDB storage with heartbeat-based retry of dead workers' trials, creating Optuna's schema if needed.

    ``create=False`` (readers: ``status``, ``export``) creates nothing: no SQLite file, no tables; a storage without
    Optuna's schema raises :class:`StudyNotFound`.
    Workers started together on a fresh database race to create the schema; PostgreSQL fails the losers (a unique
    violation on a type or table), which then open it again, once it exists (:func:`archon_server.db.retry_race`).
    """
    engine_kwargs: dict[str, Any] = {}
    url = normalize_url(url)
    check_url(url)  # a URL no database answers to: one line, nothing created
    path = sqlite_path(url)
    if url.startswith("sqlite"):
        # Several processes write one file: wait for the lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
        if path is not None:
            if not create and not path.is_file():
                raise StudyNotFound([f"no study here: the file {path} does not exist"], redacted(url))
            if create:
                _prepare_sqlite(path)
            engine_kwargs.pop("connect_args")
            engine_kwargs["creator"] = _sqlite_creator(path)
    else:
        engine_kwargs["pool_pre_ping"] = True  # long searches outlive idle server connections
    kwargs: dict[str, Any] = {"engine_kwargs": engine_kwargs}
    if heartbeat_interval:
        kwargs["heartbeat_interval"] = heartbeat_interval
        kwargs["grace_period"] = grace_period or 2 * heartbeat_interval
        retry = retry_callback(max_retry, kwargs["grace_period"])
        # Optuna 4.x renamed failed_trial_callback; accept both so optuna>=3.6 works.
        params = inspect.signature(RDBStorage.__init__).parameters
        key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
        kwargs[key] = retry
    if not create:
        probe = sa.create_engine(url, **engine_kwargs)
        try:
            if not sa.inspect(probe).has_table("studies"):
                raise StudyNotFound(["no study in this database (no Optuna tables)"], redacted(url))
        finally:
            probe.dispose()
        if "skip_table_creation" in inspect.signature(RDBStorage.__init__).parameters:  # (optuna >= 3.5)
            kwargs["skip_table_creation"] = True

    def reachable(_: sa.exc.SQLAlchemyError) -> bool:
        # Lost the race to create the schema -- unless the database cannot be reached at all: then this raises
        # the connection error at once (the CLI's one-line "cannot open the database").
        probe = sa.create_engine(url, **engine_kwargs)
        try:
            with probe.connect():
                pass
        finally:
            probe.dispose()
        return False  # the schema may be half made: open it again

    def open_storage() -> RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, **kwargs)

    storage = retry_race(open_storage, settled=reachable, what="creating the study schema")
    assert storage is not None  # reachable() never says settled
    return storage


def open_existing_study(url: str, study_name: str | None) -> optuna.Study:
    """Load a study for reading (``status``, ``export``) without creating anything; ``study_name`` None: the only one.
    A missing study is a :class:`StudyNotFound` that names the studies the storage holds."""
    st = make_storage(url, heartbeat_interval=None, create=False)  # a reader: no stale-trial handling
    names = optuna.get_all_study_names(storage=st)
    if study_name is None and len(names) == 1:
        study_name = names[0]
    if study_name not in names:
        held = ", ".join(repr(n) for n in names)
        if not names:
            what = "no study in this storage (it holds none)" if study_name is None else \
                f"no study {study_name!r} in this storage (it holds none)"
            hint = "pass the --storage the search ran on"
        elif study_name is None:
            what, hint = f"several studies in this storage ({held})", "pass --study to name one"
        else:
            what, hint = f"no study {study_name!r} in this storage (it holds {held})", \
                "pass --study, or the --storage the search ran on"
        raise StudyNotFound([f"{what}; {hint}"], redacted(url))
    return optuna.load_study(study_name=study_name, storage=st)


def heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    # Duck-typed: a study wraps the RDBStorage in Optuna's (private) caching storage, which delegates heartbeats.
    get = getattr(storage, "get_heartbeat_interval", None)
    return hasattr(storage, "record_heartbeat") and get is not None and get() is not None


def storage_retry(storage: optuna.storages.BaseStorage) -> ClaimedRetry | None:
    """The retry callback :func:`make_storage` gave this storage (None for a storage built elsewhere)."""
    get = getattr(storage, "get_heartbeat_stale_trial_callback", None) or getattr(storage, "get_failed_trial_callback", None)
    retry = get() if get is not None else None  # (the second: Optuna 3.x's name)
    return retry if isinstance(retry, ClaimedRetry) else None


# Optuna's schema (its tables, not its private ORM classes): RUNNING trials and their heartbeat rows.
_TRIALS = sa.table("trials", sa.column("trial_id"), sa.column("number"), sa.column("study_id"), sa.column("state"))
_BEATS = sa.table("trial_heartbeats", sa.column("trial_id"), sa.column("heartbeat", sa.DateTime))


def heartbeat_ages(study: optuna.Study) -> dict[int, float | None]:
    """Each RUNNING trial's seconds since its last heartbeat (None: none recorded yet), by the database's clock, as
    Optuna's stale-trial check reads it (``now() - heartbeat``; a reader needs no heartbeat settings of its own).
    Empty for a storage without a database (in-memory)."""
    engine = claims.storage_engine(study._storage)  # noqa: SLF001 - Optuna exposes no public accessor
    if engine is None:
        return {}
    with engine.connect() as con:
        now = con.execute(sa.select(sa.func.now())).scalar()
        rows = con.execute(sa.select(_TRIALS.c.number, _BEATS.c.heartbeat)
                           .select_from(_TRIALS.outerjoin(_BEATS, _BEATS.c.trial_id == _TRIALS.c.trial_id))
                           .where(_TRIALS.c.study_id == study._study_id,  # noqa: SLF001
                                  sa.cast(_TRIALS.c.state, sa.String) == TrialState.RUNNING.name)).all()
    if isinstance(now, str):  # SQLite without a type to parse it by
        now = datetime.fromisoformat(now)
    out: dict[int, float | None] = {}
    for number, beat in rows:
        if isinstance(beat, str):
            beat = datetime.fromisoformat(beat)
        out[int(number)] = None if beat is None or now is None else \
            (now.replace(tzinfo=None) - beat.replace(tzinfo=None)).total_seconds()
    return out


def reap_stale_trials(study: optuna.Study, *, final: Callable[[optuna.trial.FrozenTrial], bool]) -> None:
    """Fail dead workers' trials and enqueue their retries: Optuna's ``fail_stale_trials``, and the two cases it misses.

    1. A worker killed between ``ask`` and its first heartbeat leaves a RUNNING trial with no heartbeat row, which
       Optuna never deems stale: every later worker waited for it forever (a CI run hung this way).  We record a
       heartbeat on its behalf: a live worker beats on over it, a dead one goes stale after the grace period.
    2. Optuna marks a stale trial FAIL and only then calls the retry callback: a reaper killed between the two left a
       FAIL trial with parameters and no retry, whose parameters were never evaluated.  Any FAIL trial with
       parameters and no retry gets one here, unless ``final(trial)`` says it failed on purpose (an error of its
       own, a surplus release) or its retries are used up; the retry claim makes it exactly once over all workers.
    """
    storage = study._storage  # noqa: SLF001 - Optuna exposes no public accessor
    if not heartbeat_enabled(storage):
        return
    engine = claims.storage_engine(storage)
    if engine is not None:
        with engine.connect() as con:
            unbeaten = con.execute(sa.select(_TRIALS.c.trial_id).where(
                _TRIALS.c.study_id == study._study_id,  # noqa: SLF001
                # Cast: PostgreSQL stores the state as an enum type, which a text parameter does not compare with.
                sa.cast(_TRIALS.c.state, sa.String) == TrialState.RUNNING.name,
                ~sa.exists().where(_BEATS.c.trial_id == _TRIALS.c.trial_id))).scalars().all()
        for trial_id in unbeaten:
            try:
                storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001 - its own worker beat first (unique row): it is alive, fine
                log.debug("heartbeat for unbeaten trial %s not recorded: %s", trial_id, e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    retry = storage_retry(storage)
    if retry is None:
        return  # a storage built elsewhere: without the claim, two workers could both enqueue
    trials = study.get_trials(deepcopy=False)
    retried = {retried_from(t) for t in trials}
    for t in trials:
        if (t.state == TrialState.FAIL and t.params and t.number not in retried and not final(t)
                and retry(study, copy.deepcopy(t))):
            log.warning("trial %d had failed without a retry (its reaper died): its parameters are enqueued again", t.number)


class Heartbeat:
    """Records a trial's heartbeat every interval from a daemon thread while the trial runs.

    (Optuna's own thread only runs inside ``study.optimize``; our ask/tell loop needs its own.)
    A daemon thread dies with the process: a kill -9 stops the heartbeat, which is the point.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int):
        self._storage = storage
        self._trial_id = trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat_enabled(storage):
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        interval = self._storage.get_heartbeat_interval() or 10  # type: ignore[attr-defined]
        while True:
            try:
                self._storage.record_heartbeat(self._trial_id)  # type: ignore[attr-defined]
            except Exception as e:  # a transient DB error must not kill the trial; the next beat retries
                log.warning("heartbeat of trial %s failed: %s", self._trial_id, e)
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Heartbeat":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
