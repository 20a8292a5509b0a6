"""One view of the traces of all ``archon serve --workers N`` processes.

Each worker keeps the traces of the requests it served (store.py); which worker serves a request is the kernel's
choice, so the console's list and ``GET /v1/traces/{id}`` would show a part, and a trace opened from the list could
be missing on the worker that answers the next request. So each worker also answers its siblings on a Unix socket in
a directory the parent made for them (0700: the wire is pickle, as in backends/shared.py), and the trace routes of any
worker ask the others: a list merges every worker's newest, a trace not kept here is looked for there. Nothing of
this is on a request's path; only reading traces asks the siblings.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from pathlib import Path
from typing import Any

from ...backends.shared import read_frame, write_frame
from .store import TraceStore

ASK_TIMEOUT_S = 2.0  # a sibling busy or gone does not hold up the list: its traces are left out


class TracePeers:
    def __init__(self, directory: str, store: TraceStore):
        self.dir = Path(directory)
        self.store = store
        self.path = self.dir / f"{os.getpid()}.sock"
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._answer, str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            op, arg = await read_frame(reader)
            write_frame(writer, self.store.summaries(arg) if op == "summaries" else self.store.get(arg))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _ask(self, path: Path, op: str, arg: Any) -> Any:
        async def ask() -> Any:
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                write_frame(writer, (op, arg))
                return await read_frame(reader)
            finally:
                writer.close()

        try:
            return await asyncio.wait_for(ask(), ASK_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, OSError):
            return None  # gone (a worker restarted leaves its socket) or busy

    def _siblings(self) -> list[Path]:
        return [p for p in self.dir.glob("*.sock") if p != self.path]

    async def summaries(self, limit: int) -> list[dict[str, Any]]:
        """Every worker's newest ``limit``, merged newest first (then cut to ``limit``)."""
        theirs = await asyncio.gather(*(self._ask(p, "summaries", limit) for p in self._siblings()))
        merged = itertools.chain(self.store.summaries(limit), *(t or [] for t in theirs))
        return sorted(merged, key=lambda e: e["created"], reverse=True)[:limit]

    async def get(self, trace_id: str) -> dict[str, Any] | None:
        mine = self.store.get(trace_id)
        if mine is not None:
            return mine
        for found in await asyncio.gather(*(self._ask(p, "get", trace_id) for p in self._siblings())):
            if found is not None:
                return found  # type: ignore[no-any-return]
        return None
