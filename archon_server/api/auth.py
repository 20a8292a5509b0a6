"""Optional bearer-key auth: keys from an environment variable and/or a file; constant-time comparison."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from ..config import ServerSettings


def load_keys(settings: ServerSettings) -> list[bytes]:
    keys: list[str] = []
    if settings.api_keys_env and os.environ.get(settings.api_keys_env):
        keys += [k.strip() for k in os.environ[settings.api_keys_env].split(",")]
    if settings.api_keys_file:
        keys += [ln.strip() for ln in Path(settings.api_keys_file).read_text().splitlines()]
    return [k.encode() for k in keys if k and not k.startswith("#")]


def check_key(header: str | None, keys: list[bytes]) -> bool:
    scheme, _, given_text = (header or "").partition(" ")
    if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 9110 §11.1): `bearer k` is a key too
        return False
    given = given_text.strip().encode()
    ok = False
    for k in keys:  # compare against all keys: timing does not reveal which (or whether one) matched
        ok |= hmac.compare_digest(given, k)
    return ok
