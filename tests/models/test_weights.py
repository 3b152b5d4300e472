"""Tests for graftlm.models.weights: a folder's safetensors read tensor by tensor into a built model
gives the same model as transformers' `from_pretrained`, and damaged files are named errors."""

from __future__ import annotations

import json

import helpers
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from graftlm.errors import GraftError
from graftlm.models import weights
from graftlm.models.load import load_model


def _state(model):
    return dict(model.named_buffers()) | model.state_dict()


def _assert_same_model(ours, reference):
    a, b = _state(ours), _state(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight or not (
        reference.config.tie_word_embeddings
    )
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_load_equals_from_pretrained(tmp_path, kind, dtype, monkeypatch):
    builder = {"llama": helpers.tiny_llama, "qwen2": helpers.tiny_qwen2}[kind]
    builder(seed=3).save_pretrained(tmp_path)
    helpers.tiny_tokenizer().save_pretrained(tmp_path)
    streamed = []
    real = weights.iter_tensors
    monkeypatch.setattr(
        weights, "iter_tensors", lambda *a, **k: streamed.append(a[0]) or real(*a, **k)
    )
    ours, _ = load_model(tmp_path, dtype=dtype)
    assert streamed, "the streamed path was not taken"
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    _assert_same_model(ours, reference)


def test_sharded_folder_loads_every_shard(tmp_path):
    helpers.tiny_llama(seed=4).save_pretrained(tmp_path, max_shard_size="20KB")
    helpers.tiny_tokenizer().save_pretrained(tmp_path)
    index = json.loads((tmp_path / weights.SHARD_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert len(weights.weight_files(tmp_path)) == len(set(index["weight_map"].values()))
    ours, _ = load_model(tmp_path)
    _assert_same_model(ours, AutoModelForCausalLM.from_pretrained(tmp_path).eval())


def test_names_that_need_conversion_fall_back_to_transformers(tmp_path):
    """A file whose names are not the model's own (a legacy or converted checkpoint) is left to
    transformers' loader, which knows the key conversions."""
    built = helpers.tiny_llama(seed=6)
    state = {k: v.contiguous() for k, v in built.state_dict().items() if k != "lm_head.weight"}
    state["model.legacy_extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / weights.SINGLE_FILE))
    with pytest.raises(weights.StreamedLoadUnsupported, match="legacy_extra"):
        weights.load_weights_streamed(built, tmp_path)


def test_truncated_file_names_the_file_and_tensor(tmp_path):
    helpers.tiny_llama(seed=7).save_pretrained(tmp_path)
    path = tmp_path / weights.SINGLE_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GraftError, match=r"model\.safetensors.*truncated"):
        list(weights.iter_tensors(path))


def test_damaged_header_is_a_named_error(tmp_path):
    path = tmp_path / weights.SINGLE_FILE
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(GraftError, match="header length"):
        weights.read_header(path)
    path.write_bytes(b"\x04")
    with pytest.raises(GraftError, match="too short"):
        weights.read_header(path)
