"""Process trees from /proc (Linux): what a test or benchmark checks of the processes a server started."""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, then the parent's pid), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (PID 1 in a container may never reap it)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live (not zombie) descendant of ``pid``, parents before their children."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        fields = _stat(d.name) if d.name.isdigit() else None
        if fields is not None and fields[0] not in ("Z", "X"):
            children.setdefault(int(fields[1]), []).append(int(d.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(0), []):
            if c not in out:
                out.append(c)
                todo.append(c)
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes ``pids`` have used so far (those gone are left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / tick
