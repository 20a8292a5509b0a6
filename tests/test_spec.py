import json
import subprocess
import sys
from pathlib import Path

import pytest

from archon_server.spec import SpecError, import_archon, load_architecture, parse_architecture

ROOT = Path(__file__).resolve().parent.parent


def test_presets_are_valid_and_cost_as_documented():
    calls = {p.stem: load_architecture(p).backend_calls_estimate() for p in (ROOT / "architectures").glob("*.yaml")}
    assert calls["moa"] == 13 and calls["moa-lite"] == 7 and calls["self-moa"] == 2
    assert calls["archon-rank-critic-fuse"] == 11  # Archon's 11-call recipe
    assert calls["best-of-n-cdr"] == 3 and calls["self-moa-rank"] == 4 and calls["best-of-n-judge"] == 31  # scorer presets


def test_error_names_the_offending_path():
    bad = {"name": "x", "layers": [[{"type": "generator", "model": "a"}], [{"type": "fuser", "model": "a"}], [{"type": "ranker", "model": "b", "top_k": 0}]]}
    with pytest.raises(SpecError) as e:
        parse_architecture(bad)
    assert e.value.errors[0].startswith("layers[2][0].top_k:")
    assert ">= 1" in e.value.errors[0] or "greater than or equal to 1" in e.value.errors[0]


@pytest.mark.parametrize(
    "layers,fragment",
    [
        ([[{"type": "fuser", "model": "a"}]], "first layer must contain a generator"),
        ([[{"type": "generator"}]], "needs `model` or `models`"),
        ([[{"type": "generator", "model": "a", "samples": 2}], []], "layer 1 is empty"),
        ([[{"type": "generator", "model": "a", "bogus": 1}]], "layers[0][0].bogus"),
        ([[{"type": "nope", "model": "a"}]], "layers[0][0]"),
    ],
)
def test_invalid_architectures(layers, fragment):
    with pytest.raises(SpecError) as e:
        parse_architecture({"name": "x", "layers": layers})
    assert fragment in str(e.value)


def test_import_archon_config():
    archon = {
        "name": "archon-example",
        "layers": [
            [{"type": "generator", "model": "Qwen/Qwen2-72B-Instruct", "model_type": "Together", "temperature": 0.7, "max_tokens": 2048, "samples": 2}],
            [{"type": "ranker", "model": "Qwen/Qwen2-72B-Instruct", "model_type": "Together", "top_k": 5, "temperature": 0.7, "max_tokens": 2048}],
            [{"type": "critic", "model": "Qwen/Qwen2-72B-Instruct", "model_type": "Together", "temperature": 0.7, "max_tokens": 2048, "samples": 1}],
            [{"type": "fuser", "model": "Qwen/Qwen2-72B-Instruct", "model_type": "Together", "temperature": 0.7, "max_tokens": 2048, "samples": 1}],
        ],
    }
    spec = import_archon(archon)
    assert [layer[0].type for layer in spec.layers] == ["generator", "ranker", "critic", "fuser"]
    assert spec.layers[0][0].samples == 2 and spec.layers[1][0].top_k == 5
    with pytest.raises(SpecError) as e:
        import_archon({"layers": [[{"type": "generator", "model": "m", "weird": 1}]]})
    assert "layers[0][0]" in str(e.value)


def test_cli_validate_schema_import(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlayers:\n  - - {type: generator, model: a}\n  - - {type: ranker, model: b, top_k: 0}\n")
    r = subprocess.run([sys.executable, "-m", "archon_server", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "layers[1][0].top_k" in r.stderr and str(bad) in r.stderr
    r = subprocess.run([sys.executable, "-m", "archon_server", "schema"], capture_output=True, text=True)
    assert r.returncode == 0 and "ArchitectureSpec" in r.stdout or "layers" in json.loads(r.stdout)["properties"]
    src = tmp_path / "a.json"
    src.write_text(json.dumps({"name": "a", "layers": [[{"type": "generator", "model": "m", "samples": 3}], [{"type": "fuser", "model": "m"}]]}))
    out = tmp_path / "a.yaml"
    r = subprocess.run([sys.executable, "-m", "archon_server", "import-archon", str(src), "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert load_architecture(out).layers[0][0].samples == 3
