"""How a long command shows its progress: ``archon bench run`` (a bar over the questions) and ``archon search run``
(a line per phase and per finished trial), both through :class:`Reporter`.

Everything goes to stderr, so stdout keeps the command's result (a report, a JSON summary); ``--no-progress`` (search:
also ``--quiet``) turns it off. Lines are written through tqdm, so they never break a bar that is drawing.
"""

from __future__ import annotations

import sys
from typing import IO, Any


class Reporter:
    """Progress of one command on stderr; ``enabled=False`` (``--no-progress``, a library caller) prints nothing."""

    def __init__(self, enabled: bool = True, file: IO[str] | None = None):
        self.enabled = enabled
        self._file = file

    @property
    def file(self) -> IO[str]:
        return self._file or sys.stderr  # looked up when written: a test's captured stderr

    def line(self, text: str) -> None:
        """One line: a phase starting (ranking the pool, finalizing), a step finished (a trial), a resume."""
        if not self.enabled:
            return
        from tqdm import tqdm

        tqdm.write(text, file=self.file)
        self.file.flush()

    def bar(self, total: int, desc: str, unit: str) -> Any:
        """A tqdm bar over ``total`` steps (None when disabled): for many short steps, as a sweep's questions."""
        if not self.enabled:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=self.file)


QUIET = Reporter(enabled=False)
