"""JSON bodies to and from upstreams: orjson where it can, json for what orjson refuses, so nothing reads differently."""

from __future__ import annotations

import json
from typing import Any

import orjson

INVALID = object()


def dumps(body: dict[str, Any]) -> bytes:
    """A request body as JSON bytes: orjson, or json for what orjson refuses (lone surrogates, big ints)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body).encode()


def loads(payload: bytes | str) -> Any:
    """JSON from an upstream, or INVALID (a marker: None is valid JSON). orjson (several times faster than json)
    first; what it refuses but json reads (lone surrogates, NaN) still goes through json."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:
            return json.loads(payload)
        except ValueError:
            return INVALID
