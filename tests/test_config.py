"""Typed backend config per kind: every field reaches its backend, every mistake is a start-up error naming its path."""

from __future__ import annotations

import pytest

from archon_server.backends.registry import BACKEND_FACTORIES, build_registry
from archon_server.config import (
    BACKEND_KINDS,
    LocalBackendConfig,
    OpenAIBackendConfig,
    VLLMBackendConfig,
    default_config,
    load_config,
    parse_config,
)
from archon_server.spec import SpecError


def errors(data) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_config(data)
    return e.value.errors


def test_kind_picks_the_model_and_openai_is_the_default():
    cfg = parse_config({"backends": [
        {"alias": "a", "urls": ["http://127.0.0.1:1/v1"]},
        {"alias": "b", "kind": "local", "options": {"threads": 2, "speculative": {"method": "fixed", "k": 3, "draft": "ngram"}}},
        {"alias": "c", "kind": "vllm", "model": "m", "options": {"replicas": 2}},
    ]})
    a, b, c = cfg.backends
    assert isinstance(a, OpenAIBackendConfig) and isinstance(b, LocalBackendConfig) and isinstance(c, VLLMBackendConfig)
    assert b.options.threads == 2 and b.options.speculative.k == 3
    assert c.options.model == "m" and c.options.replicas == 2  # the backend's model is vLLM's launch model
    assert set(BACKEND_FACTORIES) == set(BACKEND_KINDS)
    assert isinstance(default_config().backends[0], LocalBackendConfig)


@pytest.mark.parametrize("block, path", [
    ({"method": "specdec"}, "backends[0].options.speculative.method"),
    ({"k": 0}, "backends[0].options.speculative.k"),
    ({"draft": "/no/such/draft"}, "backends[0].options.speculative"),
    ({"method": "fixed", "kk": 3}, "backends[0].options.speculative.kk"),
    ({"min_k": 5, "max_k": 3}, "backends[0].options.speculative"),
])
def test_bad_speculative_block_is_a_startup_error_naming_the_path(tmp_path, block, path):
    """Was: parsed in the engine's worker thread, a 502 on every request. Now the config does not load."""
    f = tmp_path / "server.yaml"
    f.write_text("backends:\n  - alias: smol\n    kind: local\n    options:\n      speculative: " + repr(block).replace("'", '"') + "\n")
    with pytest.raises(SpecError) as e:
        load_config(f)
    assert e.value.source == str(f)
    assert any(m.startswith(path + ":") for m in e.value.errors), e.value.errors


def test_an_option_of_another_kind_or_an_unknown_kind_names_its_path():
    assert any(m.startswith("backends[0].urls:") for m in errors({"backends": [{"alias": "x", "kind": "local", "urls": ["http://h/v1"]}]}))
    assert any(m.startswith("backends[0].options.tensor_parallel:") for m in
               errors({"backends": [{"alias": "x", "kind": "vllm", "model": "m", "options": {"tensor_parallel": 2}}]}))
    assert any(m.startswith("backends[0].options:") for m in errors({"backends": [{"alias": "x", "kind": "vllm"}]}))
    msgs = errors({"backends": [{"alias": "x", "kind": "grpc"}]})
    assert msgs[0].startswith("backends[0]:") and "openai, local, vllm" in msgs[0]
    assert errors({"backends": [{"alias": "x"}]}) == ["backends[0]: kind openai needs `urls`"]


async def test_every_openai_field_reaches_the_backend_and_the_upstream(upstream_factory):
    """make_backend used to drop backoff_base_s, backoff_max_s and extra_headers."""
    up = upstream_factory()
    cfg = parse_config({"backends": [{"alias": "x", "urls": [up.url], "backoff_base_s": 0.05, "backoff_max_s": 0.5,
                                      "extra_headers": {"X-Team": "research"}, "read_timeout_s": 7}]})
    reg = build_registry(cfg)
    b = reg.get("x")
    assert (b.backoff_base_s, b.backoff_max_s, b.extra_headers, b.read_timeout_s) == (0.05, 0.5, {"X-Team": "research"}, 7)
    from archon_server.backends.base import ChatRequest

    await reg.start()
    try:
        await b.chat(ChatRequest("fake-model", [{"role": "user", "content": "hi"}]))
    finally:
        await reg.close()
    assert up.requests[0].headers.get("X-Team") == "research"


def test_local_backend_gets_its_typed_options():
    from archon_server.backends.local import LocalBackend

    reg = build_registry(parse_config({"backends": [{"alias": "s", "kind": "local", "options": {
        "threads": 1, "max_batch": 4, "progress": False, "speculative": {"method": "fixed", "k": 3, "draft": "ngram"}}}]}))
    b = reg.get("s")
    assert isinstance(b, LocalBackend) and b.engine is None  # built, not started
    assert (b.threads, b.max_batch, b.progress) == (1, 4, False)
    assert b.speculative == {"method": "fixed", "k": 3, "draft": "ngram"}  # as written: the engine applies its defaults
