"""Server configuration: backends (model aliases), architecture folders, limits.

A leaf-level module like ``spec``: validated with pydantic, errors name the path
(``backends[1].urls: ...``).  ``archon serve`` with no config uses
:func:`default_config`: the embedded SmolLM2 engine behind every preset alias.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

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


# Memory for prompt-prefix K/V kept across requests (engine/prefix_cache.py) unless a backend sets
# ``prefix_cache_mb``: a pool of this size (untouched until used), about 180 blocks of 32 tokens of SmolLM2 in
# float32, 360 in bf16 -- the system prompts and templates a sweep or an ensemble repeats.
DEFAULT_PREFIX_CACHE_MB = 256.0


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendConfigBase(_Base):
    """What every kind of backend has: its names and how many calls it takes at once."""

    alias: str = Field(min_length=1, description="Name architectures use for this backend.")
    model: str = Field(default="", description="Model name at the upstream (openai/vllm) or local model id.")
    aliases: list[str] = Field(default_factory=list, description="More aliases that resolve to this backend.")
    max_concurrency: int = Field(default=256, ge=1, description="Backend calls in flight at once (excess waits).")


class OpenAIBackendConfig(BackendConfigBase):
    """``kind: openai`` (the default): any OpenAI-compatible HTTP server, several replicas balanced."""

    kind: Literal["openai"] = "openai"
    urls: list[str] = Field(default_factory=list, description="Base URLs (…/v1) of replicas.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the upstream API key.")
    supports_n: bool = True
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=300.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)
    backoff_base_s: float = Field(default=0.25, gt=0, description="Retry backoff: full jitter up to base * 2^attempt.")
    backoff_max_s: float = Field(default=8.0, gt=0, description="Cap of one backoff (and of an upstream's Retry-After).")
    max_connections: int = Field(default=256, ge=1)
    breaker_failures: int = Field(default=5, ge=1)
    breaker_cooldown_s: float = Field(default=10.0, gt=0)
    extra_headers: dict[str, str] = Field(default_factory=dict, description="Sent with every upstream request.")

    @model_validator(mode="after")
    def _check(self) -> "OpenAIBackendConfig":
        if not self.urls:
            raise ValueError("kind openai needs `urls`")
        for u in self.urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"url {u!r} must start with http:// or https://")
        return self


# Names of the engine's stopping rules (engine/specdec/policies.make_policy) and of its shipped drafts and heads.
SPECULATIVE_METHODS = ("specdec_pp", "specdecpp", "specdec++", "fixed", "heuristic", "confidence", "entropy", "cumprob")
SHIPPED_DRAFTS = ("eagle", "ngram")
SHIPPED_HEADS = ("proposer", "candidate")


class SpeculativeOptions(_Base):
    """A local backend's speculative decoding (README: 'Speculative decoding'), checked when the config loads."""

    method: Literal[SPECULATIVE_METHODS] = "cumprob"  # type: ignore[valid-type]
    draft: str | None = Field(default=None, description="eagle (shipped) | ngram | an EAGLE or HF model folder.")
    head: str | None = Field(default=None, description="proposer | candidate (shipped) | a head folder.")
    threshold: float | None = None
    k: int | None = Field(default=None, ge=1)
    min_k: int = Field(default=2, ge=1)
    max_k: int = Field(default=20, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "SpeculativeOptions":
        if self.min_k > self.max_k:
            raise ValueError(f"min_k ({self.min_k}) is above max_k ({self.max_k})")
        for name, value, shipped in (("draft", self.draft, SHIPPED_DRAFTS), ("head", self.head, SHIPPED_HEADS)):
            if value and value not in shipped and not Path(value).is_dir():
                raise ValueError(f"{name} {value!r} is neither {' nor '.join(shipped)} nor a folder")
        return self


class LocalOptions(_Base):
    """``options`` of ``kind: local`` (the embedded engine)."""

    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = Field(default=16, ge=1, description="Most sequences decoded together (one step reads the weights once for all).")
    progress: bool = Field(default=True, description="Print the first start's model conversion progress.")
    threads: int | Literal["auto"] = Field(default="auto", description="Torch threads, or auto: tuned from step times.")
    speculative: SpeculativeOptions | None = None
    lazy: bool = Field(default=False, description="Load on first use, not at start (a model only some architectures use).")
    prefix_cache_mb: float = Field(default=DEFAULT_PREFIX_CACHE_MB, ge=0, description="Memory (MB) for prompt-prefix K/V reused across requests; 0 turns it off.")
    kv_cache_mb: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        default="auto", description="Most memory (MB) of the sequences' KV cache; auto: a quarter of the machine's (or the GPU's). "
        "A request that needs more waits for others to finish; one that cannot fit alone is refused (400).")


class LocalBackendConfig(BackendConfigBase):
    """``kind: local``: the in-process engine."""

    kind: Literal["local"]
    options: LocalOptions = Field(default_factory=LocalOptions)



class VLLMOptions(_Base):
    """Launch options of a managed vLLM backend (``options`` of a ``kind: vllm`` backend)."""

    model: str = Field(min_length=1, description="HF folder, hub id, or a model-store name (e.g. smollm2-135m-instruct).")
    served_model_name: str | None = Field(default=None, description="Name vLLM serves the model under (default: the backend name).")
    python: str | None = Field(default=None, description="Interpreter of the vLLM venv (default: $ARCHON_VLLM_PYTHON, ./.venv-vllm, this one).")
    command: list[str] | None = Field(default=None, description="Full launch argv template; see backends/vllm_managed.py.")
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=1, le=65535, description="Port of replica 0 (replica i: port+i); default: free ports.")
    replicas: int = Field(default=1, ge=1, le=64)
    replica_devices: list[str] | None = Field(default=None, description="CUDA_VISIBLE_DEVICES per replica, e.g. ['0', '1'] or ['0,1', '2,3'].")
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=16)
    dtype: str | None = None
    speculative_config: dict[str, Any] | None = Field(default=None, description="Passed as --speculative-config JSON (draft model, eagle, ngram...).")
    enforce_eager: bool = False
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    api_key_env: str | None = Field(default=None, description="Env var with a key vLLM should require (passed as VLLM_API_KEY).")
    startup_timeout_s: float = Field(default=900.0, gt=0)
    stop_grace_s: float = Field(default=15.0, ge=0)
    restart: bool = True
    restart_backoff_s: float = Field(default=1.0, gt=0)
    restart_backoff_max_s: float = Field(default=60.0, gt=0)
    read_timeout_s: float = Field(default=600.0, gt=0)
    log_level: str = Field(default="INFO", description="Level at which vLLM's own log lines are forwarded.")

    @model_validator(mode="after")
    def _check(self) -> "VLLMOptions":
        if self.replica_devices is not None and len(self.replica_devices) != self.replicas:
            raise ValueError("replica_devices needs one entry per replica")
        if self.command is not None and not self.command:
            raise ValueError("command must not be empty")
        return self


class VLLMBackendConfig(BackendConfigBase):
    """``kind: vllm``: vLLM processes the server launches and supervises; ``model`` is the launch model too."""

    kind: Literal["vllm"]
    options: VLLMOptions

    @model_validator(mode="before")
    @classmethod
    def _model_into_options(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("model"):
            opts = data.get("options")
            if opts is None or isinstance(opts, dict):
                data = {**data, "options": {"model": data["model"], **(opts or {})}}
        return data


BACKEND_KINDS = ("openai", "local", "vllm")


def _backend_kind(v: Any) -> str:
    return (v.get("kind") or "openai") if isinstance(v, dict) else getattr(v, "kind", "openai")


# One backend entry of a config: the `kind` field picks the model (missing: openai), so every kind has its own fields
# and an option of another kind is an error naming its path, at start-up.
BackendConfig = Annotated[
    Union[
        Annotated[OpenAIBackendConfig, Tag("openai")],
        Annotated[LocalBackendConfig, Tag("local")],
        Annotated[VLLMBackendConfig, Tag("vllm")],
    ],
    Discriminator(_backend_kind, custom_error_type="backend_kind",
                  custom_error_message=f"kind: must be one of {', '.join(BACKEND_KINDS)}"),
]


class ServerSettings(_Base):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_concurrent_requests: int = Field(default=256, ge=1, description="Beyond this, requests get 429 at once.")
    max_body_bytes: int = Field(default=4_000_000, ge=1024)
    max_inflight_body_bytes: int = Field(default=64_000_000, ge=1024, description="Bytes of request bodies in flight at once, all requests together (beyond: 429 at once).")
    max_n: int = Field(default=16, ge=1)
    max_messages: int = Field(default=512, ge=1)
    request_timeout_s: float = Field(default=600.0, gt=0, description="Deadline of one request (whole graph).")
    shutdown_grace_s: float = Field(default=5.0, ge=0, description="On SIGTERM, how long requests in flight may go on; "
                                    "then they are cancelled and answered 503 (a stream: its error ending).")
    api_keys_env: str | None = Field(default="ARCHON_API_KEYS", description="Comma-separated client keys in this env var.")
    api_keys_file: str | None = Field(default=None, description="File with one client key per line.")
    default_architecture: str | None = None
    keep_traces: int = Field(default=100, ge=0, description="Recent requests' traces kept in memory for /v1/traces and /ui (0: none).")

    @model_validator(mode="after")
    def _budget(self) -> "ServerSettings":
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError("max_inflight_body_bytes must be >= max_body_bytes (else a largest-allowed body never gets in)")
        return self


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
            LocalBackendConfig(
                alias="smollm2",
                kind="local",
                model=os.environ.get("ARCHON_LOCAL_MODEL", "smollm2-135m-instruct"),
                aliases=PRESET_ALIASES,
            ),
            LocalBackendConfig(alias="gemma3-270m", kind="local", model="gemma3-270m", aliases=[WEAK_ALIAS], options=LocalOptions(lazy=True)),
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
        raise SpecError(validation_messages(e, tags=BACKEND_KINDS), source) from None
    if base_dir is not None:
        cfg.architectures_dirs = [str((base_dir / d)) if not Path(d).is_absolute() else d for d in cfg.architectures_dirs]
    return cfg


def load_config(path: str | Path | None) -> ServerConfig:
    if path is None:
        try:
            return default_config()
        except ValidationError as e:  # ARCHON_LOCAL_MODEL names no model
            raise SpecError(validation_messages(e, tags=BACKEND_KINDS), "default config (ARCHON_LOCAL_MODEL)") from None
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"<root>: cannot read: {e.strerror}"], str(p)) from None
    return parse_config(load_text(text, str(p)), str(p), base_dir=p.parent)
