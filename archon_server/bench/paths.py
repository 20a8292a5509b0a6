"""Where the read-only benchmark data lives.

Order: an explicit path, then ``$ARCHON_DATA_DIR``, then ``<repo root>/../shared/data``.
Nothing is ever downloaded: a missing file is an error that names the path tried.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


class DataNotFound(FileNotFoundError):
    pass


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    if path is not None:
        p = Path(path)
    elif os.environ.get("ARCHON_DATA_DIR"):
        p = Path(os.environ["ARCHON_DATA_DIR"])
    else:
        p = _REPO_ROOT.parent / "shared" / "data"
    if not p.is_dir():
        raise DataNotFound(f"benchmark data directory not found: {p} (set ARCHON_DATA_DIR or pass a path)")
    return p


def data_file(rel: str, root: str | os.PathLike[str] | None = None) -> Path:
    p = data_dir(root) / rel
    if not p.exists():
        raise DataNotFound(f"benchmark data file not found: {p}")
    return p
