"""A sweep store shared by many ``archon bench run`` workers: cached backend calls and result rows in one
database (PostgreSQL across hosts, SQLite on one), so several workers split one sweep without duplicates.

Without a store a sweep keeps its state in its output folder (``results.jsonl`` + ``cache.sqlite``).
With ``--store URL`` every worker runs the same sweep file against the same URL:

* **result rows** are keyed on (sweep, architecture, benchmark, item, sample): the primary key makes
  every write idempotent.  Before running a question a worker *claims* its row (``INSERT ... ON
  CONFLICT DO NOTHING``); a row another worker holds is skipped.  A claim is a lease kept alive by a
  heartbeat; a killed worker's rows go stale after ``lease_s`` and the next worker that reaches them
  (or the restarted one) takes them over with a compare-and-swap ``UPDATE``.  A question that failed
  (``error``) in an earlier run is retried, as with ``results.jsonl``; a success is never run twice.
* **cached calls** (:class:`SqlCallCache`) replace ``cache.sqlite``: the same content-addressed keys,
  so a worker replays what another worker already paid for.
* the **outputs stay as they are**: ``results.jsonl`` is written from the store when a worker
  finishes (:meth:`StoreResults.export_jsonl`) or by ``archon bench report OUT --store URL``,
  and the report is made from it exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..db import check_url, create_tables, normalize_url, sqlite_path, worker_id
from .definition import stamped, version_problem
from .sweep import SweepMismatch as SweepMismatch  # raised by register(); importable from here as before
from .sweep import same_results, sweep_changes

log = logging.getLogger("archon.bench.store")

_META = sa.MetaData()
SWEEPS = sa.Table(
    "archon_sweeps", _META,
    sa.Column("sweep", sa.String(200), primary_key=True),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)
RESULTS = sa.Table(
    "archon_sweep_results", _META,
    sa.Column("sweep", sa.String(200), primary_key=True),
    sa.Column("arch", sa.String(300), primary_key=True),
    sa.Column("benchmark", sa.String(100), primary_key=True),
    sa.Column("item", sa.String(300), primary_key=True),
    sa.Column("sample", sa.Integer, primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),  # running | done | error
    sa.Column("worker", sa.String(200), nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("record", sa.Text),
)
CALLS = sa.Table(
    "archon_sweep_calls", _META,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)



def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    check_url(url)  # a URL no database answers to: one line, nothing created
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"timeout": 60}}
    engine = sa.create_engine(url, **kwargs)
    if path is not None:
        with engine.begin() as con:
            con.exec_driver_sql("PRAGMA journal_mode=WAL")
    create_tables(_META, engine)
    return engine


def _insert_ignore(engine: Engine, table: sa.Table) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` in the engine's dialect (SQLite and PostgreSQL both have it)."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise ValueError(f"sweep store: unsupported database {engine.dialect.name!r} (use PostgreSQL or SQLite)")
    return insert(table).on_conflict_do_nothing()


class SqlCallCache:
    """The :class:`~archon_server.bench.cache.CacheStore` interface (get/put/len/close) on the shared database."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._insert = _insert_ignore(engine, CALLS)

    def get(self, key: str) -> dict[str, Any] | None:
        with self.engine.connect() as con:
            v = con.execute(sa.select(CALLS.c.value).where(CALLS.c.key == key)).scalar_one_or_none()
        return json.loads(v) if v is not None else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        # First writer wins: two workers that both missed got equally valid samples; keep one for replay.
        with self.engine.begin() as con:
            con.execute(self._insert.values(key=key, value=json.dumps(value, ensure_ascii=False), created=time.time()))

    def __len__(self) -> int:
        with self.engine.connect() as con:
            return int(con.execute(sa.select(sa.func.count()).select_from(CALLS)).scalar_one())

    def close(self) -> None:
        pass  # the engine belongs to the SweepStore


class StoreResults:
    """The :class:`~archon_server.bench.sweep.ResultsLog` interface over the shared result rows, plus claims.

    ``done`` (keys of succeeded questions) is read once at start; :meth:`claim` is the authority
    while running, so a question another worker finished meanwhile is skipped there.
    """

    def __init__(self, engine: Engine, sweep: str, *, lease_s: float = 60.0, worker: str | None = None):
        from .sweep import result_key

        self.engine = engine
        self.sweep = sweep
        self.lease_s = lease_s
        self.worker = worker or worker_id()
        self.started = time.time()
        self._insert = _insert_ignore(engine, RESULTS)
        self._held: set[tuple[str, str, str, int]] = set()
        self._skipped: set[tuple[str, str, str, int]] = set()  # held by another worker when we reached them
        self._beat: asyncio.Task[None] | None = None
        with engine.connect() as con:
            rows = con.execute(sa.select(RESULTS.c.arch, RESULTS.c.benchmark, RESULTS.c.item).where(
                RESULTS.c.sweep == sweep, RESULTS.c.status == "done"))
            self.done: set[str] = {result_key(a, b, i) for a, b, i in rows}

    # -- the sweep's definition ----------------------------------------------------------------------
    def register(self, spec: dict[str, Any], source: str = "sweep store") -> None:
        """Record the sweep's definition once (:func:`~archon_server.bench.sweep.sweep_definition`); a worker started
        with a different one is refused (it would mix results), naming what changed
        (:func:`~archon_server.bench.sweep.sweep_changes`: concurrency may differ per worker), as is one whose stored
        definition an archon-server of another definition version registered (its splits and parameters differ)."""
        text = json.dumps(stamped(spec), sort_keys=True)
        with self.engine.begin() as con:
            con.execute(_insert_ignore(self.engine, SWEEPS).values(sweep=self.sweep, spec=text, created=time.time()))
            stored = con.execute(sa.select(SWEEPS.c.spec).where(SWEEPS.c.sweep == self.sweep)).scalar_one()
        old = json.loads(stored)
        problem = version_problem(old, f"the store's sweep {self.sweep!r} holds a definition",
                                  "rename the sweep or use another store", same_results(old))
        if problem is not None:
            raise SweepMismatch([problem], source)
        changes = sweep_changes(old, json.loads(text))
        if changes:
            raise SweepMismatch([f"the store holds a different definition of sweep {self.sweep!r}; changed: " + "; ".join(changes),
                                 "workers must run the same sweep file and --limit; rename the sweep or use another store"], source)

    # -- claims --------------------------------------------------------------------------------------
    def _pk(self, arch: str, benchmark: str, item: str, sample: int) -> Any:
        return sa.and_(RESULTS.c.sweep == self.sweep, RESULTS.c.arch == arch, RESULTS.c.benchmark == benchmark,
                       RESULTS.c.item == item, RESULTS.c.sample == sample)

    def claim_sync(self, arch: str, benchmark: str, item: str, sample: int = 0) -> bool:
        now = time.time()
        with self.engine.begin() as con:
            # RETURNING, not rowcount: psycopg reports -1 rows for INSERT ... ON CONFLICT DO NOTHING.
            won = con.execute(self._insert.values(sweep=self.sweep, arch=arch, benchmark=benchmark, item=item, sample=sample,
                                                  status="running", worker=self.worker, heartbeat_at=now)
                              .returning(RESULTS.c.sample)).first() is not None
            if not won:
                # Take over a dead worker's stale lease, or a question that failed in an earlier run.
                stale = sa.and_(RESULTS.c.status == "running", RESULTS.c.heartbeat_at < now - self.lease_s)
                failed_before = sa.and_(RESULTS.c.status == "error", RESULTS.c.finished_at < self.started)
                won = con.execute(RESULTS.update().where(self._pk(arch, benchmark, item, sample), sa.or_(stale, failed_before))
                                  .values(status="running", worker=self.worker, heartbeat_at=now)).rowcount == 1
        if won:
            self._held.add((arch, benchmark, item, sample))
            self._skipped.discard((arch, benchmark, item, sample))
        else:
            self._skipped.add((arch, benchmark, item, sample))
        return won

    async def claim(self, arch: str, benchmark: str, item: str, sample: int = 0) -> bool:
        return await asyncio.to_thread(self.claim_sync, arch, benchmark, item, sample)

    def _unfinished_sync(self) -> tuple[set[tuple[str, str, str, int]], bool]:
        """(skipped rows still running elsewhere, whether any of them has a stale lease)."""
        now = time.time()
        out: set[tuple[str, str, str, int]] = set()
        stale = False
        with self.engine.connect() as con:
            rows = con.execute(sa.select(RESULTS.c.arch, RESULTS.c.benchmark, RESULTS.c.item, RESULTS.c.sample,
                                         RESULTS.c.heartbeat_at).where(RESULTS.c.sweep == self.sweep,
                                                                       RESULTS.c.status == "running"))
            for a, b, i, n, beat in rows:
                if (a, b, i, n) in self._skipped:
                    out.add((a, b, i, n))
                    stale = stale or beat < now - self.lease_s
        return out, stale

    async def wait_for_others(self, on_wait: Callable[[int], None] | None = None) -> set[str]:
        """Wait while questions this worker skipped run elsewhere; return the keys whose worker died (stale
        lease) so the sweep claims them again, or nothing once all are finished.  ``on_wait(n)`` is told, at each
        look, that ``n`` questions are still leased by other workers (the progress bar says so)."""
        from .sweep import result_key

        while True:
            running, stale = await asyncio.to_thread(self._unfinished_sync)
            self._skipped &= running
            if not running:
                return set()
            if stale:
                return {result_key(a, b, i) for a, b, i, _ in running}
            if on_wait is not None:
                on_wait(len(running))
            await asyncio.sleep(min(5.0, self.lease_s / 3))

    def heartbeat(self) -> int:
        """Renew this worker's leases; returns how many rows it still holds."""
        if not self._held:
            return 0
        with self.engine.begin() as con:
            return con.execute(RESULTS.update().where(RESULTS.c.sweep == self.sweep, RESULTS.c.worker == self.worker,
                                                      RESULTS.c.status == "running").values(heartbeat_at=time.time())).rowcount

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await asyncio.to_thread(self.heartbeat)
            except Exception as e:  # noqa: BLE001 - a transient DB error must not stop the sweep; the next beat retries
                log.warning("sweep store heartbeat failed: %s", e)

    async def __aenter__(self) -> StoreResults:
        self._beat = asyncio.create_task(self._beat_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat

    # -- results -------------------------------------------------------------------------------------
    def append_sync(self, rec: dict[str, Any]) -> None:
        from .sweep import result_key

        sample = int(rec.get("sample", 0))
        status = "error" if rec.get("error") else "done"
        with self.engine.begin() as con:
            n = con.execute(RESULTS.update().where(
                self._pk(rec["arch"], rec["benchmark"], rec["id"], sample), RESULTS.c.worker == self.worker,
                RESULTS.c.status == "running",
            ).values(status=status, record=json.dumps(rec, ensure_ascii=False), finished_at=time.time())).rowcount
        self._held.discard((rec["arch"], rec["benchmark"], rec["id"], sample))
        if n == 0:
            # Our lease lapsed and another worker took the question over: its record will be the one kept.
            log.warning("sweep store: %s/%s/%s was taken over by another worker; keeping theirs",
                        rec["arch"], rec["benchmark"], rec["id"])
        elif status == "done":
            self.done.add(result_key(rec["arch"], rec["benchmark"], rec["id"]))

    async def append(self, rec: dict[str, Any]) -> None:
        await asyncio.to_thread(self.append_sync, rec)

    @property
    def records(self) -> list[dict[str, Any]]:
        """One record per finished question (its success, else its latest failure), in key order."""
        with self.engine.connect() as con:
            rows = con.execute(sa.select(RESULTS.c.record).where(RESULTS.c.sweep == self.sweep, RESULTS.c.record.is_not(None))
                               .order_by(RESULTS.c.arch, RESULTS.c.benchmark, RESULTS.c.item, RESULTS.c.sample))
            return [json.loads(r) for (r,) in rows]

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as con:
            rows = con.execute(sa.select(RESULTS.c.status, sa.func.count()).where(RESULTS.c.sweep == self.sweep)
                               .group_by(RESULTS.c.status))
            return {s: int(n) for s, n in rows}

    def export_jsonl(self, path: str | Path) -> int:
        """Write ``results.jsonl`` from the store (atomically: a reader never sees half a file); returns the rows."""
        recs = self.records
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return len(recs)


class SweepStore:
    """One database for a sweep's workers: the call cache and the result rows."""

    def __init__(self, url: str, sweep: str, *, lease_s: float = 60.0):
        self.url = url
        self.engine = make_engine(url)
        self.calls = SqlCallCache(self.engine)
        self.results = StoreResults(self.engine, sweep, lease_s=lease_s)

    def sweeps(self) -> list[str]:
        """The names of the sweeps the store holds (registered by a worker)."""
        with self.engine.connect() as con:
            return sorted(con.execute(sa.select(SWEEPS.c.sweep)).scalars())

    def close(self) -> None:
        self.engine.dispose()
