"""JSONBodyRoute (api/json_route.py) answers every body as FastAPI's own handler does, on a real uvicorn server."""

from __future__ import annotations

import json
from typing import ClassVar

import httpx
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.responses import Response

from archon_server.api.chat.protocol import ChatCompletionRequest
from archon_server.api.errors import validation_handler
from archon_server.api.json_route import JSONBodyRoute, is_json_content_type
from archon_server.testing.server import ServerThread

OK = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
BODIES = {
    "valid": json.dumps(OK),
    "unicode": json.dumps({**OK, "messages": [{"role": "user", "content": "é 😀"}]}, ensure_ascii=False),
    "lax types": json.dumps({**OK, "max_tokens": "5", "temperature": 1}),
    "extra field": json.dumps({**OK, "zzz": [1, {"a": None}]}),
    "duplicate key": '{"model": "a", "model": "b", "messages": [{"role": "user", "content": "hi"}]}',
    "not JSON": '{"model": ',
    "NaN": json.dumps({**OK, "temperature": float("nan")}),
    "big int": '{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 123456789012345678901234567890}',
    "two errors": json.dumps({**OK, "messages": [], "n": "x"}),
    "nested error": json.dumps({**OK, "messages": [{"role": "bogus"}]}),
    "empty": "",
}


class Counted(ChatCompletionRequest):
    """Counts the bodies that took the lean path (the only caller of model_validate_json here)."""

    lean_calls: ClassVar[int] = 0

    @classmethod
    def model_validate_json(cls, *a, **kw):  # type: ignore[no-untyped-def,override]
        Counted.lean_calls += 1
        return super().model_validate_json(*a, **kw)


def _app() -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(RequestValidationError, validation_handler)  # type: ignore[arg-type]

    async def echo(body: Counted, request: Request) -> Response:
        return Response(body.model_dump_json(), media_type="application/json")

    def teapot() -> None:
        raise HTTPException(418, "a router-level dependency ran")

    general, lean = APIRouter(route_class=APIRoute), APIRouter(route_class=JSONBodyRoute)
    general.post("/general")(echo)
    lean.post("/lean")(echo)
    app.include_router(general)
    app.include_router(lean)
    # Included with a dependency of the including router: the lean path must step aside so that it runs.
    app.include_router(lean, prefix="/guarded", dependencies=[Depends(teapot)])
    return app


def test_the_lean_route_answers_like_fastapis_handler() -> None:
    app = _app()
    with ServerThread(app) as s:
        assert httpx.post(f"{s.url}/guarded/lean", json=OK).status_code == 418
        Counted.lean_calls = 0
        assert httpx.post(f"{s.url}/lean", json=OK).json()["model"] == "m"
        assert Counted.lean_calls == 1
        for content_type in ("application/json", "application/json; charset=utf-8", "application/vnd.x+json", None, "text/plain"):
            headers = {"content-type": content_type} if content_type else {}
            for name, body in BODIES.items():
                g = httpx.post(f"{s.url}/general", content=body.encode(), headers=headers)
                le = httpx.post(f"{s.url}/lean", content=body.encode(), headers=headers)
                assert (le.status_code, le.json()) == (g.status_code, g.json()), (content_type, name)
        # A top-level JSON value that is not an object: the same 400, worded by pydantic's JSON parser.
        g = httpx.post(f"{s.url}/general", json=[1, 2])
        le = httpx.post(f"{s.url}/lean", json=[1, 2])
        assert g.status_code == le.status_code == 400
        assert le.json()["error"]["param"] is None and "object" in le.json()["error"]["message"]
        assert Counted.lean_calls == 2 + 3 * (len(BODIES) - 1)  # every JSON-typed, non-empty body took the lean path


def test_json_content_types() -> None:
    assert is_json_content_type("application/json")
    assert is_json_content_type("Application/JSON ; charset=utf-8")
    assert is_json_content_type("application/problem+json")
    assert not is_json_content_type("text/json")
    assert not is_json_content_type("application/jsonx")
    assert not is_json_content_type("multipart/form-data")
