"""The one catalog: architectures from folders plus backend aliases, used by serving, /v1/models, sweeps and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from archon_server.backends.registry import build_registry
from archon_server.graph.catalog import ARCHITECTURE_SUFFIXES, Catalog, UnknownArchitecture
from archon_server.spec import SpecError
from conftest import ROOT, fake_config

ARCH = "name: {name}\ndescription: d-{name}\nlayers:\n  - - type: generator\n      model: default\n"


def test_lookup_resolve_list_and_reload(tmp_path: Path):
    reg = build_registry(fake_config("http://127.0.0.1:9/v1"))
    (tmp_path / "a.yaml").write_text(ARCH.format(name="alpha"))
    (tmp_path / "notes.txt").write_text("not an architecture")
    cat = Catalog([tmp_path], reg)
    assert cat.names() == ["alpha"] and len(cat) == 1
    assert cat.lookup("alpha").description == "d-alpha"
    # A backend alias is served straight through: one generator on that alias.
    spec = cat.lookup("judge")
    assert spec is not None and spec.layers[0][0].model == "judge" and "judge" in cat
    assert cat.lookup("nobody") is None and "nobody" not in cat
    with pytest.raises(UnknownArchitecture, match="known: alpha"):
        cat.resolve("nobody")
    # Files only where the caller allows them (CLI, sweeps), relative to base_dir.
    with pytest.raises(UnknownArchitecture):
        cat.resolve("a.yaml")
    assert cat.resolve("a.yaml", files=True, base_dir=tmp_path).name == "alpha"
    cards = cat.list_models()
    assert cards[0].id == "alpha" and cards[0].kind == "architecture"
    assert [c.id for c in cards[1:]] == reg.aliases() and {c.kind for c in cards[1:]} == {"backend"}

    (tmp_path / "b.yml").write_text(ARCH.format(name="beta"))
    assert cat.reload() == ["alpha", "beta"]
    # A bad file: the reload fails naming it, and the catalog keeps what it had.
    (tmp_path / "c.json").write_text('{"name": "gamma", "layers": []}')
    with pytest.raises(SpecError, match="c.json"):
        cat.reload()
    assert cat.names() == ["alpha", "beta"]
    assert ARCHITECTURE_SUFFIXES == (".yaml", ".yml", ".json")


def test_presets_load_and_shadow_aliases():
    reg = build_registry(fake_config("http://127.0.0.1:9/v1"))
    cat = Catalog([ROOT / "architectures"], reg)
    assert {"moa", "self-moa", "best-of-n"} <= set(cat.names())
    ids = [c.id for c in cat.list_models()]
    assert len(ids) == len(set(ids))


def test_cli_run_resolves_presets_files_and_aliases_through_the_catalog(upstream_factory, tmp_path, capsys):
    import yaml

    from archon_server.cli import main

    up = upstream_factory()
    cfg = tmp_path / "server.yaml"
    cfg.write_text(yaml.safe_dump(fake_config(up.url).model_dump(mode="json")))
    (tmp_path / "mine.yaml").write_text(ARCH.format(name="mine"))
    for arch in ["self-moa", str(tmp_path / "mine.yaml"), "judge"]:
        assert main(["run", "Hi", "-a", arch, "-c", str(cfg)]) == 0, arch
    out = capsys.readouterr().out.splitlines()
    assert out == ["fused answer from 6 responses", "answer 0 from fake-model", "answer 0 from fake-model"]
    with pytest.raises(SystemExit) as e:
        main(["run", "Hi", "-a", "no-such-thing", "-c", str(cfg)])
    assert e.value.code == 2 and "unknown architecture 'no-such-thing'" in capsys.readouterr().err


def test_a_subcommand_whose_import_fails_says_so(monkeypatch, capsys):
    """`archon bench` used to vanish silently when its import failed (logged at debug before logging was set up)."""
    from archon_server import cli

    monkeypatch.setitem(cli._PLUGINS, "bench", "archon_server.no_such_module")
    assert "unavailable" in cli.build_parser().format_help()
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "run", "x.yaml"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "`archon bench` is unavailable" in err and "no_such_module" in err


def test_one_exception_root_and_one_failure_code_map():
    from archon_server.api.errors import APIError, failure_code
    from archon_server.api.structured import StructuredOutputInvalid
    from archon_server.backends.base import BackendError, BackendTimeout
    from archon_server.backends.registry import UnknownModel
    from archon_server.components.base import ComponentFailed, ParseError
    from archon_server.exceptions import ArchonError
    from archon_server.graph.runtime import GraphError

    for cls in (SpecError, BackendError, BackendTimeout, UnknownModel, UnknownArchitecture, GraphError, ComponentFailed,
                ParseError, StructuredOutputInvalid, APIError):
        assert issubclass(cls, ArchonError), cls
    # Streamed and JSON answers take their code from the same map: a 400 is never labelled "timeout" (the stream's did).
    assert (failure_code(400), failure_code(502), failure_code(504)) == ("invalid_value", "upstream_error", "timeout")
