"""Identifiers of answers (``chatcmpl-…``, ``cmpl-…``, ``resp_…``): the one place they are made."""

from __future__ import annotations

import os


def new_id(prefix: str) -> str:
    """``prefix`` and 128 random bits from the OS (32 hex digits): unguessable, since an answer's id also fetches its
    trace (``GET /v1/traces/{id}``). ``os.urandom`` as ``uuid.uuid4`` uses it, without building a UUID object
    (0.45 us instead of 2 us, on every request)."""
    return prefix + os.urandom(16).hex()
