"""Our HTTP server over a managed vLLM: the Self-MoA preset through `archon serve`, driven by the openai SDK.

Marker `vllm`; skipped when the vLLM venv is absent (failed under CI) (see tests/test_vllm.py).  Also
checks that stopping the server (SIGTERM) leaves no vLLM process behind.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import jsonschema
import openai
import pytest
import yaml

from archon_server.config import PRESET_ALIASES
from archon_server.testing.server import serve_process
from archon_server.testing.procs import alive, descendants

from archon_server.backends.vllm_managed import vllm_missing
from conftest import needs

ROOT = Path(__file__).resolve().parent.parent
_missing = vllm_missing()
pytestmark = [pytest.mark.vllm, needs("vLLM", _missing), pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cfg = {
        "backends": [
            {
                "alias": "smollm2",
                "kind": "vllm",
                "model": "smollm2-135m-instruct",
                "aliases": PRESET_ALIASES,
                "options": {"enforce_eager": True, "max_model_len": 4096, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "startup_timeout_s": 900},
            }
        ],
        "server": {"default_architecture": "self-moa"},
    }
    d = tmp_path_factory.mktemp("vllm-server")
    (d / "archon.yaml").write_text(yaml.safe_dump(cfg))
    args = ["serve", "--config", str(d / "archon.yaml"), "--architectures", str(ROOT / "architectures")]
    with serve_process(args, log=d / "serve.log", cwd=str(ROOT), timeout=900) as (proc, url):
        yield proc, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)


def test_self_moa_over_vllm(server) -> None:  # type: ignore[no-untyped-def]
    _, client = server
    r = client.chat.completions.create(
        model="self-moa",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        max_tokens=64,
        extra_body={"return_trace": True},
    )
    text = r.choices[0].message.content or ""
    assert text.strip() and "<|im_end|>" not in text
    trace = r.model_extra["trace"]
    assert trace["calls"] == 2 and trace["layers"][0]["calls"][0]["n"] == 6  # six samples, one vLLM request
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="self-moa", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=32, stream=True) if c.choices]
    assert sum(1 for c in chunks if c) > 1


def test_structured_outputs_completions_and_responses_over_vllm(server) -> None:  # type: ignore[no-untyped-def]
    """response_format json_schema reaches vLLM's guided decoding on the final stage; raw completions and the
    Responses API go through the same managed backend."""
    _, client = server
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="self-moa", messages=[{"role": "user", "content": "Name a large city and its population."}], max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        extra_body={"return_trace": True},
    )
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)
    assert r.model_extra["trace"]["calls"] == 2  # guided on the first try: no second run of the graph
    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, echo=True, logprobs=1, temperature=0)
    assert c.choices[0].text.startswith("The capital of France is") and c.choices[0].logprobs.tokens
    resp = client.responses.create(model="smollm2", input="Say hello.", max_output_tokens=16)
    assert resp.status in ("completed", "incomplete") and resp.output_text.strip()
    # vLLM's extra sampling params, as a client sends them with extra_body, reach vLLM: min_tokens holds EOS back
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Reply with just: ok"}], max_tokens=12,
                                       temperature=0, extra_body={"min_tokens": 12, "top_k": 5, "repetition_penalty": 1.1})
    assert r.usage.completion_tokens == 12


def test_sigterm_leaves_no_vllm_process(server) -> None:  # type: ignore[no-untyped-def]
    proc, _ = server
    kids = descendants(proc.pid)
    assert kids, "the server should have launched vLLM"
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    deadline = time.time() + 60
    while any(alive(p) for p in kids) and time.time() < deadline:
        time.sleep(0.5)
    assert not [p for p in kids if alive(p)]
