"""The web console: static files under /ui, shipped in the package (no build step).

The page itself holds no data, so it loads without a key; every request it makes goes to the /v1 API with the
bearer key the user typed once (kept in sessionStorage), under the same auth as any client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
PREFIX = "/ui"


def is_public(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def mount_ui(app: FastAPI) -> None:
    @app.get(PREFIX, include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse(PREFIX + "/")

    app.mount(PREFIX + "/", StaticFiles(directory=STATIC, html=True, check_dir=False), name="ui")
