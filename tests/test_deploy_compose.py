"""The docker compose example (deploy/): linted by Compose itself where it is installed (.ci/run installs
Debian's docker-compose), and checked here for what the README promises: one PostgreSQL URL shared by the
search workers and the dashboard, N workers, a stateless server with a health check, configs that load."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from archon_server.config import load_config
from archon_server.search.config import load_search_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _compose_cmd() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_file_is_valid_for_compose() -> None:
    cmd = _compose_cmd()
    if cmd is None:
        if os.environ.get("CI"):
            pytest.fail("CI must lint deploy/compose.yaml: neither `docker compose` nor `docker-compose` is installed")
        pytest.skip("no docker compose / docker-compose here (the structural test below still runs)")
    out = subprocess.run([*cmd, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"], capture_output=True, text=True,
                         cwd=DEPLOY, check=False)
    assert out.returncode == 0, out.stderr


def test_compose_example_wires_the_services_as_documented() -> None:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = data["services"]
    assert {"postgres", "vllm", "archon", "search-worker", "dashboard"} <= set(services)
    storage = {s["environment"]["ARCHON_STORAGE"] for name, s in services.items() if name in ("archon", "search-worker", "dashboard")}
    assert len(storage) == 1 and next(iter(storage)).startswith("postgresql://")
    worker = services["search-worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert "search run /config/search.yaml" in worker["entrypoint"][-1] and "$$ARCHON_STORAGE" in worker["entrypoint"][-1]
    assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "dashboard" in services["dashboard"]["entrypoint"][-1]
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["vllm"]
    # The mounted configs are real configs of this project.
    cfg = load_config(DEPLOY / "archon.yaml")
    assert cfg.backends[0].urls == ["http://vllm:8000/v1"]
    search = load_search_config(DEPLOY / "search.yaml")
    assert search.evaluation.backends == "/config/archon.yaml"
    assert {m.name for m in search.models} <= set(cfg.backends[0].aliases)
