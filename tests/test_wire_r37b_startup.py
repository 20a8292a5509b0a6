"""`archon serve` refuses, at start-up, config mistakes it can see before serving (exit 2, one line naming the config
path and the value): a `server.default_architecture` that names nothing served (it had started, and every request
without `model` got a 404 naming a model the client never sent), and a `kind: local` backend naming a model the
model store does not know (it had started with /health at 503 for good)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def serve(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.yaml"
    path.write_text(config)
    return subprocess.run([sys.executable, "-m", "archon_server", "serve", "-c", str(path), "--port", "0"], capture_output=True,
                          text=True, timeout=120, cwd=str(ROOT), env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


BACKEND = "backends: [{alias: fast, urls: ['http://127.0.0.1:9/v1'], model: m}]\n"


@pytest.mark.parametrize("default, why", [
    ("no-such-arch", "it is not an architecture or backend alias of this config"),
    ("self-moa", "its aliases have no backend"),  # a preset whose aliases this config does not bind
])
def test_a_default_architecture_that_cannot_be_served_refuses_to_start(tmp_path, default, why):
    r = serve(tmp_path, BACKEND + f"server: {{default_architecture: {default}}}\n")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'c.yaml'}: server.default_architecture: '{default}' cannot be served: {why}")
    assert "Traceback" not in r.stderr


def test_a_default_naming_a_backend_alias_is_accepted():
    from archon_server.api.app import check_default
    from archon_server.backends.registry import build_registry
    from archon_server.config import parse_config
    from archon_server.graph.catalog import Catalog

    cfg = parse_config({"backends": [{"alias": "fast", "urls": ["http://127.0.0.1:9/v1"], "model": "m"}]})
    check_default("fast", Catalog(cfg.architectures_dirs, build_registry(cfg)))


def test_a_local_backend_with_an_unknown_model_refuses_to_start(tmp_path):
    r = serve(tmp_path, "backends: [{alias: smollm2, kind: local, model: no-such-model}]\n")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [f"{tmp_path / 'c.yaml'}: backends[0].model: unknown model 'no-such-model'; known: gemma3-270m, "
                     "smollm2-135m-instruct (or a converted model's folder)"]
