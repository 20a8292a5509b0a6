"""The architecture catalog for editors and the console: one architecture, the JSON Schema, live validation."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ...graph.runtime import graph_outline
from ...spec import (
    ArchitectureSpec,
    SpecError,
    dump_architecture,
    json_schema,
    load_text,
    parse_architecture,
)
from ..errors import APIError

router = APIRouter()


class ValidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(max_length=1_000_000, description="An architecture as YAML or JSON.")


def _describe(spec: ArchitectureSpec) -> dict[str, Any]:
    return {"name": spec.name, "description": spec.description, "yaml": dump_architecture(spec),
            "architecture": spec.model_dump(mode="json"), "graph": graph_outline(spec),
            "calls_estimate": spec.backend_calls_estimate()}


@router.get("/v1/architectures/schema")
async def architecture_schema() -> dict[str, Any]:
    """The JSON Schema of architecture files (what `archon schema` prints)."""
    return json.loads(json_schema())


@router.post("/v1/architectures/validate")
async def validate_architecture(body: ValidateRequest) -> dict[str, Any]:
    """Check an architecture text; errors name the path (`layers[1][0].top_k: ...`). Always 200: the verdict is the answer."""
    try:
        spec = parse_architecture(load_text(body.text))
    except SpecError as e:
        return {"valid": False, "errors": e.errors}
    return {"valid": True, "errors": [], **_describe(spec)}


@router.get("/v1/architectures/{name}")
async def get_architecture(name: str, request: Request) -> dict[str, Any]:
    spec = request.app.state.catalog.architectures.get(name)
    if spec is None:
        raise APIError(404, f"no architecture {name!r}", param="name", code="model_not_found")
    return _describe(spec)
