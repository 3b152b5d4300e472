"""`load_model(..., quantize="nf4")`: the linear layers turn 4-bit as their weights are read, into
the very layers (bit for bit) that quantizing after a full load makes, and the full-precision
linear weights are never written into the model."""

from __future__ import annotations

import pytest
import torch

from graftlm.adapters.base_model import base_fingerprint, quantize_base
from graftlm.models.gguf_cache import MARKER
from graftlm.models.load import load_model
from graftlm.quant.nf4_linear import NF4Linear
from graftlm.quant.q4_grid import Q4GridLinear
from tests.helpers import tiny_model_factory, tiny_tokenizer

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402


def _on_q4_1_grid(weight: torch.Tensor) -> torch.Tensor:
    """The weight as GGUF's Q4_1 quantizer and dequantizer leave it (fp32)."""
    packed = gguf_quants.quantize(weight.float().numpy(), GGMLQuantizationType.Q4_1)
    return torch.from_numpy(gguf_quants.dequantize(packed, GGMLQuantizationType.Q4_1).copy())


def _model_dir(tmp_path, kind: str, grid: bool):
    """A tiny model folder; `grid`: every linear weight on a Q4_1 grid, and the folder marked as
    a GGUF conversion (as the built-in model's cached folder is)."""
    model = tiny_model_factory(kind, seed=1)
    if grid:
        with torch.no_grad():
            for name, module in model.named_modules():
                if type(module) is torch.nn.Linear and not name.endswith("lm_head"):
                    module.weight.copy_(_on_q4_1_grid(module.weight))
    folder = tmp_path / f"{kind}-{'grid' if grid else 'plain'}"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    if grid:
        (folder / MARKER).write_text("{}\n")
    return folder


def _layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if getattr(m, "is_quantized_linear", False)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kind", "grid"), [("llama", True), ("llama", False), ("qwen2", False)])
def test_quantized_as_read_equals_quantized_after_the_load(tmp_path, kind, grid, dtype):
    folder = _model_dir(tmp_path, kind, grid)
    after, _ = load_model(folder, dtype=dtype)
    quantize_base(after)
    read, _ = load_model(folder, dtype=dtype, quantize="nf4")

    expected, found = _layers(after), _layers(read)
    assert expected and list(found) == list(expected)
    for name, layer in expected.items():
        assert type(found[name]) is type(layer), name
        if grid:  # the grids are found in fp32 weights and in a GGUF conversion's files alike
            assert type(layer) is Q4GridLinear, name
    state_after, state_read = after.state_dict(), read.state_dict()
    assert list(state_read) == list(state_after)
    for key, value in state_after.items():
        assert state_read[key].dtype == value.dtype and torch.equal(state_read[key], value), key
    if kind == "qwen2":  # q/k/v biases: kept, frozen, in their own dtype
        bias = read.model.layers[0].self_attn.q_proj.bias
        assert bias is not None and not bias.requires_grad and bias.dtype == dtype
    assert base_fingerprint(read) == base_fingerprint(after)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        assert torch.equal(read(ids).logits, after(ids).logits)


def test_the_full_precision_linear_weights_are_never_written(tmp_path, monkeypatch):
    """The loader copies nothing into a linear layer it quantizes as read (the copy is what would
    make those pages resident); every other tensor is copied as before."""
    folder = _model_dir(tmp_path, "llama", grid=False)
    copied: list[tuple[int, ...]] = []
    original = torch.Tensor.copy_

    def spy(self, source, *args, **kwargs):
        copied.append(tuple(self.shape))
        return original(self, source, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    model, _ = load_model(folder, dtype=torch.bfloat16, quantize="nf4")
    monkeypatch.undo()
    linear_shapes = {tuple(m.weight.shape) for m in tiny_model_factory("llama").modules()
                     if type(m) is torch.nn.Linear}  # fmt: skip
    embedding = tuple(model.get_input_embeddings().weight.shape)
    assert embedding in copied  # the embedding is copied (and the lm_head tied to it)
    assert not linear_shapes & set(copied) - {embedding}
    assert all(type(m) is NF4Linear for m in _layers(model).values())


def test_an_unknown_quantization_is_a_clear_error(tmp_path):
    from graftlm.errors import GraftError

    with pytest.raises(GraftError, match="quantize='int8'"):
        load_model(_model_dir(tmp_path, "llama", grid=False), quantize="int8")
