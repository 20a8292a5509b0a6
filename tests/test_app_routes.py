"""How build_app wires FastAPI: the endpoint routes sit in the app's own route list, and FastAPI's native
OpenTelemetry is on only when OpenTelemetry is set up at start (api/app.py)."""

from __future__ import annotations

import os
import sys

import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute

from archon_server.api.app import add_routes_first, native_telemetry


def test_endpoint_routes_come_first_and_a_router_with_include_settings_is_refused() -> None:
    app = FastAPI()
    plain = APIRouter()

    @plain.post("/v1/x")
    async def x() -> dict[str, str]:
        return {}

    add_routes_first(app, [plain])
    assert isinstance(app.router.routes[0], APIRoute) and app.router.routes[0].path == "/v1/x"
    assert "/v1/x" in app.openapi()["paths"]  # still in the schema
    for bad in (APIRouter(prefix="/p"), APIRouter(tags=["t"]), APIRouter(dependencies=[Depends(lambda: None)])):
        with pytest.raises(ValueError, match="include_router"):
            add_routes_first(app, [bad])


def test_native_telemetry_follows_opentelemetry_set_up_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith(("OTEL_", "FASTAPI_OTEL_"))]:
        monkeypatch.delenv(k)
    monkeypatch.delitem(sys.modules, "opentelemetry.sdk", raising=False)
    assert native_telemetry() == {"tracing": False, "metrics": False, "logs": False}
    monkeypatch.setenv("OTEL_SERVICE_NAME", "archon")
    assert native_telemetry() == {}
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    assert native_telemetry() == {}
    monkeypatch.delenv("FASTAPI_OTEL_AUTO_CONFIGURE")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", sys)  # any module object: "the SDK is loaded"
    assert native_telemetry() == {}
