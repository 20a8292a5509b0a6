"""Give freed heap memory back to the OS once the server goes idle after a burst.

glibc keeps memory that was freed in the middle of its heaps (and, with ``PYTHONMALLOC=malloc``, all of Python's
small objects live there too), so without this the RSS stays at the high-water mark of the largest burst: after
1000 concurrent streams, +15-20 % for good (benchmarks/load.py). ``malloc_trim(0)`` returns those pages; it is
cheap (milliseconds) and only runs when no request is in flight, at most once per ``interval_s``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("archon.api")


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


async def trim_when_idle(admitted: Callable[[], int], inflight: Callable[[], int], interval_s: float = 5.0) -> None:
    """Forever: when requests were admitted since the last trim and none is in flight now, trim the heap."""
    trim = malloc_trim()
    if trim is None:
        return
    seen = admitted()
    while True:
        await asyncio.sleep(interval_s)
        now = admitted()
        if now != seen and inflight() == 0:
            seen = now
            trim(0)
            log.debug("heap trimmed after %d request(s)", now)
