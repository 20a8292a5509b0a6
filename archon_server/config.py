"""Server configuration: backends (model aliases), architecture folders, limits.

A leaf-level module like ``spec``: validated with pydantic, errors name the path
(``backends[1].urls: ...``).  ``archon serve`` with no config uses
:func:`default_config`: the embedded SmolLM2 engine behind every preset alias.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .spec import SpecError, load_text, validation_messages

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent


def presets_dir() -> Path:
    """The shipped presets: the checkout's `architectures/` (editable install), else <prefix>/share/archon-server."""
    repo = REPO_ROOT / "architectures"
    return repo if repo.is_dir() else Path(sys.prefix) / "share" / "archon-server" / "architectures"


# Aliases the shipped presets use; the default config binds them all to the local model.
PRESET_ALIASES = ["default", "aggregator", "judge"] + [f"proposer-{i}" for i in range(1, 9)]
# The less-aligned model density-ratio scorers divide by (best-of-n-cdr, self-moa-rank); the default config binds
# it to the gemma3-270m base model, loaded on first use.
WEAK_ALIAS = "weak"


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendConfig(_Base):
    alias: str = Field(min_length=1, description="Name architectures use for this backend.")
    kind: Literal["openai", "local", "vllm"] = "openai"
    model: str = Field(default="", description="Model name at the upstream (openai/vllm) or local model id.")
    urls: list[str] = Field(default_factory=list, description="Base URLs (…/v1) of replicas (kind openai).")
    aliases: list[str] = Field(default_factory=list, description="More aliases that resolve to this backend.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the upstream API key.")
    supports_n: bool = True
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=300.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)
    max_connections: int = Field(default=256, ge=1)
    max_concurrency: int = Field(default=256, ge=1, description="Backend calls in flight at once (excess waits).")
    breaker_failures: int = Field(default=5, ge=1)
    breaker_cooldown_s: float = Field(default=10.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict, description="Kind-specific options (local engine, vllm launch).")

    @model_validator(mode="after")
    def _check(self) -> "BackendConfig":
        if self.kind == "openai" and not self.urls:
            raise ValueError("kind openai needs `urls`")
        for u in self.urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"url {u!r} must start with http:// or https://")
        return self


class ServerSettings(_Base):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_concurrent_requests: int = Field(default=256, ge=1, description="Beyond this, requests get 429 at once.")
    max_body_bytes: int = Field(default=4_000_000, ge=1024)
    max_n: int = Field(default=16, ge=1)
    max_messages: int = Field(default=512, ge=1)
    request_timeout_s: float = Field(default=600.0, gt=0, description="Deadline of one request (whole graph).")
    api_keys_env: str | None = Field(default="ARCHON_API_KEYS", description="Comma-separated client keys in this env var.")
    api_keys_file: str | None = Field(default=None, description="File with one client key per line.")
    default_architecture: str | None = None
    keep_traces: int = Field(default=100, ge=0, description="Recent requests' traces kept in memory for /v1/traces and /ui (0: none).")


class ServerConfig(_Base):
    backends: list[BackendConfig] = Field(default_factory=list)
    architectures_dirs: list[str] = Field(default_factory=lambda: [str(presets_dir())])
    server: ServerSettings = Field(default_factory=ServerSettings)

    @model_validator(mode="after")
    def _unique(self) -> "ServerConfig":
        seen: set[str] = set()
        for i, b in enumerate(self.backends):
            for a in [b.alias, *b.aliases]:
                if a in seen:
                    raise ValueError(f"backends[{i}]: alias {a!r} defined twice")
                seen.add(a)
        return self


def default_config() -> ServerConfig:
    """The zero-setup config: SmolLM2-135M-Instruct in-process, all preset aliases bound to it; the gemma3-270m base
    model as ``weak`` (density-ratio scoring), loaded only when an architecture first scores with it."""
    return ServerConfig(
        backends=[
            BackendConfig(
                alias="smollm2",
                kind="local",
                model=os.environ.get("ARCHON_LOCAL_MODEL", "smollm2-135m-instruct"),
                aliases=PRESET_ALIASES,
            ),
            BackendConfig(alias="gemma3-270m", kind="local", model="gemma3-270m", aliases=[WEAK_ALIAS], options={"lazy": True}),
        ],
        server=ServerSettings(default_architecture="self-moa"),
    )


def parse_config(data: Any, source: str | None = None, base_dir: Path | None = None) -> ServerConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(["<root>: a config must be a mapping"], source)
    try:
        cfg = ServerConfig.model_validate(data)
    except ValidationError as e:
        raise SpecError(validation_messages(e), source) from None
    if base_dir is not None:
        cfg.architectures_dirs = [str((base_dir / d)) if not Path(d).is_absolute() else d for d in cfg.architectures_dirs]
    return cfg


def load_config(path: str | Path | None) -> ServerConfig:
    if path is None:
        return default_config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"<root>: cannot read: {e.strerror}"], str(p)) from None
    return parse_config(load_text(text, str(p)), str(p), base_dir=p.parent)
