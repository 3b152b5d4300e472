"""Many adapters in one batch: the gathered-bmm path (methods/lora_rows.py) against each row alone.

Adapters differ in rank, targets and scaling (rsLoRA); bases are plain fp32 and NF4 (QLoRA).
Rows without an adapter must come out exactly as the base computes them in the same batch.
"""

from __future__ import annotations

import helpers
import pytest
import torch
from visible_models import one_thread  # noqa: F401  (autouse fixture)

import graftlm
from graftlm.methods.lora import rows as lora_rows
from graftlm.methods.lora.config import LoraConfig

ADAPTERS = {
    "wide": LoraConfig(rank=8, alpha=16, targets="all-linear"),
    "qv": LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), use_rslora=True),
    "mlp": LoraConfig(rank=2, alpha=4, targets=("down_proj", "up_proj")),
    "emb": LoraConfig(rank=3, alpha=3, targets=("embed_tokens", "o_proj")),
}


def adapted_model(quantize: str | None = None) -> torch.nn.Module:
    model = helpers.tiny_llama(initializer_range=0.1)
    generator = torch.Generator().manual_seed(0)
    for name, config in ADAPTERS.items():
        graftlm.inject(model, config.replace(quantize=quantize), name=name)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname or "lora_embedding_A" in pname:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def batch(rows: int = 6, length: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, helpers.TINY_VOCAB, (rows, length), generator=generator)


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gathered_rows_equal_each_row_alone(quantize):
    model = adapted_model(quantize)
    ids = batch()
    names = ["wide", "qv", None, "mlp", "emb", "qv"]
    with graftlm.row_adapters(model, names):
        batched = logits(model, ids)
    for row, name in enumerate(names):
        with graftlm.row_adapters(model, [name]):
            alone = logits(model, ids[row : row + 1])
        # float rounding differs with the batch size (and between bmm and linear)
        torch.testing.assert_close(batched[row : row + 1], alone, atol=2e-4, rtol=1e-4)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer._row_bank is not None  # the gathered path ran, not the loop


def test_gathered_rows_equal_the_per_adapter_loop(monkeypatch):
    model = adapted_model()
    ids = batch()
    names = ["mlp", "wide", "wide", None, "qv", "emb"]
    with graftlm.row_adapters(model, names):
        gathered = logits(model, ids)
        monkeypatch.setattr(lora_rows, "MIN_GROUPS", 10**6)
        looped = logits(model, ids)
    torch.testing.assert_close(gathered, looped, atol=1e-5, rtol=1e-5)


def test_rows_without_an_adapter_are_exactly_the_base():
    model = adapted_model()
    ids = batch()
    names = [None, "wide", None, "qv", "mlp", None]
    with graftlm.row_adapters(model, names):
        mixed = logits(model, ids)
    with graftlm.row_adapters(model, [None] * len(names)):
        base = logits(model, ids)
    for row in (0, 2, 5):
        assert torch.equal(mixed[row], base[row])


def test_bank_follows_in_place_edits_and_deleted_adapters():
    model = adapted_model()
    ids = batch(rows=3)
    names = ["wide", "qv", "mlp"]
    with graftlm.row_adapters(model, names):
        before = logits(model, ids)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["qv"].weight.mul_(3.0)
    with graftlm.row_adapters(model, names):
        after = logits(model, ids)
    with graftlm.row_adapters(model, ["qv"]):
        alone = logits(model, ids[1:2])
    assert not torch.allclose(before[1], after[1])
    torch.testing.assert_close(after[1:2], alone, atol=2e-4, rtol=1e-4)
    graftlm.delete_adapter(model, "mlp")
    assert model.model.layers[0].mlp.down_proj._row_bank is None


def test_training_mode_and_gradients_use_the_loop():
    model = adapted_model().train()
    graftlm.set_adapter(model, ["wide", "qv"])  # trainable
    ids = batch(rows=2)
    with graftlm.row_adapters(model, ["wide", "qv"]):
        out = model(input_ids=ids).logits
    out.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.lora_B["wide"].weight.grad is not None
    assert getattr(model.model.layers[0].self_attn.q_proj, "_row_bank", None) is None


def test_generate_with_an_adapter_per_row_equals_each_alone():
    from graftlm.infer.generate import SamplingConfig, generate

    model, tokenizer = adapted_model(), helpers.tiny_tokenizer()
    prompts = ["hello", "a longer prompt here", "xyz", "mid size", "q"]
    names = ["wide", "qv", None, "mlp", "emb"]
    sampling = SamplingConfig(max_new_tokens=8)
    batched = generate(model, tokenizer, prompts, adapters=names, sampling=sampling)
    alone = [
        generate(model, tokenizer, [p], adapters=[n], sampling=sampling)[0]
        for p, n in zip(prompts, names)
    ]
    assert batched == alone


def test_bank_is_kept_while_the_batch_keeps_its_adapters():
    model = adapted_model()
    layer = model.model.layers[1].mlp.down_proj
    ids = batch(rows=4)
    with graftlm.row_adapters(model, ["wide", "mlp", "qv", "wide"]):
        logits(model, ids)
    bank = layer._row_bank
    with graftlm.row_adapters(model, ["wide", "mlp", "qv", "wide"]):  # a new step, same rows
        logits(model, ids)
    assert layer._row_bank is bank
    names = ["wide", "mlp", "mlp", "wide"]  # same adapters on this layer, other rows
    with graftlm.row_adapters(model, names):
        remapped = logits(model, ids)
    assert layer._row_bank is bank
    for row, name in enumerate(names):
        with graftlm.row_adapters(model, [name]):
            alone = logits(model, ids[row : row + 1])
        torch.testing.assert_close(remapped[row : row + 1], alone, atol=2e-4, rtol=1e-4)


def test_lora_dropout_in_training_mode_keeps_the_loop():
    model = helpers.tiny_llama()
    for name in ("a", "b"):
        graftlm.inject(model, LoraConfig(rank=2, targets=("q_proj",), dropout=0.5), name=name)
    layer = model.model.layers[0].self_attn.q_proj
    ids = batch(rows=2)
    with graftlm.row_adapters(model, ["a", "b"]):
        logits(model.train(), ids)
        assert getattr(layer, "_row_bank", None) is None  # dropout applies: loop path
        logits(model.eval(), ids)
        assert layer._row_bank is not None


@pytest.mark.parametrize(
    "names",
    [["wide", "qv", None, "mlp", "emb", "qv"], ["qv", None, "qv", None, None, "qv"], ["wide"] * 6],
)
def test_decode_steps_through_the_c_kernel_equal_torch_and_each_row_alone(names, monkeypatch):
    from graftlm.kernels import small_batch_linear

    if small_batch_linear.kernel() is None:
        pytest.skip("no C compiler or no AVX2/FMA here: decode steps run on torch")
    model = adapted_model()
    small_batch_linear.use_small_batch_kernel(model)
    ids = batch(length=1)  # one token per row: a decode step's shape
    with graftlm.row_adapters(model, names):
        kernel = logits(model, ids)
    for row, name in enumerate(names):
        with graftlm.row_adapters(model, [name]):
            alone = logits(model, ids[row : row + 1])
        assert torch.equal(kernel[row : row + 1], alone)  # the kernel is batch-invariant
    layer = model.model.layers[0].self_attn.q_proj
    one_adapter = len({n for n in names if n}) == 1
    assert (getattr(layer, "_row_bank", None) is None) == one_adapter  # one: no bank
    monkeypatch.setattr(small_batch_linear, "add_lora", lambda *args, **kwargs: False)
    monkeypatch.setattr(small_batch_linear, "kernel", lambda: None)
    with graftlm.row_adapters(model, names):
        torch_path = logits(model, ids)
    torch.testing.assert_close(kernel, torch_path, atol=1e-5, rtol=1e-5)
