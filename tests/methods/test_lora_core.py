"""The LoRA core: invariants, several named adapters, merging, PiSSA, and clear errors.

Tiny random Llama (GQA, tied embeddings), Qwen2 (q/k/v biases) and GPT-2 (Conv1D) models in
fp32, eval mode, fixed seeds. The invariants are the ones every LoRA implementation owes its
users: a zero update changes nothing, merged equals unmerged, merge is idempotent, unmerge
restores the base, only adapter parameters train, and save -> load is exact.
"""

from __future__ import annotations

import json

import helpers
import pytest
import torch
import transformers
from visible_models import (  # noqa: F401
    BUILDERS,
    one_thread,
    perturb_trainable,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
)

import graftlm
from graftlm.errors import GraftError
from graftlm.methods.lora.config import LoraConfig
from graftlm.methods.lora.files import adapter_state_dict
from graftlm.methods.lora.inject import lora_layers
from graftlm.methods.lora.layer import LoraEmbedding, LoraLayerBase, LoraLinear

# every model's attention and MLP projections, in its own names
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def inputs(rows: int = 3, length: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, helpers.TINY_VOCAB, (rows, length), generator=generator)


def logits(model: torch.nn.Module, ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs() if ids is None else ids, **kwargs).logits.float()


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def lora_weight_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The layer weights that LoRA layers hold (these are what merge changes)."""
    return {n: layer.weight.detach().clone() for n, layer in lora_layers(model)}


# -- invariants -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_zero_update_leaves_output_unchanged(arch, init):
    model = BUILDERS[arch]()
    expected = logits(model)
    graftlm.inject(model, LoraConfig(rank=4, alpha=8, targets=TARGETS[arch], init=init))
    assert torch.equal(logits(model), expected)


def test_zero_update_on_embedding_leaves_output_unchanged():
    model = tiny_llama()
    expected = logits(model)
    graftlm.inject(model, LoraConfig(rank=4, targets=["embed_tokens", "q_proj"]))
    assert isinstance(model.model.embed_tokens, LoraEmbedding)
    assert torch.equal(logits(model), expected)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_merge_unmerge_invariants(arch):
    model = BUILDERS[arch]()
    base_logits = logits(model)
    graftlm.inject(model, LoraConfig(rank=4, alpha=8, targets=TARGETS[arch]))
    base_weights = lora_weight_names(model)
    perturb_trainable(model)
    unmerged = logits(model)
    assert (unmerged - base_logits).abs().max() > 1e-3

    graftlm.merge(model)
    close(logits(model), unmerged)  # merged == unmerged
    once = lora_weight_names(model)
    assert any(not torch.equal(once[n], base_weights[n]) for n in once)
    graftlm.merge(model)
    twice = lora_weight_names(model)
    assert all(torch.equal(once[n], twice[n]) for n in once)  # merge twice == once
    close(logits(model), unmerged)

    graftlm.unmerge(model)
    restored = lora_weight_names(model)
    for name in restored:
        close(restored[name], base_weights[name], atol=1e-6)
    close(logits(model), unmerged)  # adapters are active again, unmerged
    with graftlm.disable_adapters(model):
        close(logits(model), base_logits)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_only_adapter_parameters_train(arch):
    model = BUILDERS[arch]()
    graftlm.inject(model, LoraConfig(rank=4, targets=TARGETS[arch]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    # every LoRA layer contributes exactly its A and B
    assert len(trainable) == 2 * len(list(lora_layers(model)))


def test_bias_options_choose_trainable_biases():
    model = tiny_qwen2()
    graftlm.inject(model, LoraConfig(rank=4, targets=["q_proj", "v_proj"], bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    biases = {n for n in trainable if n.endswith("bias")}
    assert biases == {
        f"model.layers.{i}.self_attn.{proj}.bias" for i in range(2) for proj in ("q_proj", "v_proj")
    }

    model = tiny_qwen2()
    graftlm.inject(model, LoraConfig(rank=4, targets=["q_proj", "v_proj"], bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    all_biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert {n for n in trainable if n.endswith("bias")} == all_biases
    assert any("k_proj.bias" in n for n in all_biases)  # not only the adapted layers'


def test_modules_to_save_train_a_copy_and_keep_the_original():
    model = tiny_qwen2()
    original = model.lm_head.weight.detach().clone()
    graftlm.inject(model, LoraConfig(rank=4, targets=["q_proj"], modules_to_save=["lm_head"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.modules_to_save.default.weight" in trainable
    assert not model.lm_head.original_module.weight.requires_grad
    assert all(".lora_" in n or ".modules_to_save.default." in n for n in trainable), trainable
    perturb_trainable(model)
    assert torch.equal(model.lm_head.original_module.weight, original)
    with graftlm.disable_adapters(model):
        close(logits(model), logits(tiny_qwen2()))


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_save_load_round_trip_is_exact(arch, tmp_path):
    model = BUILDERS[arch]()
    config = LoraConfig(rank=4, alpha=8, targets=TARGETS[arch], use_rslora=arch == "gpt2")
    graftlm.inject(model, config)
    perturb_trainable(model)
    graftlm.save_adapter(model, tmp_path / "a")

    fresh = BUILDERS[arch]()
    loaded = graftlm.load_adapter(fresh, tmp_path / "a")
    assert loaded.rank == 4 and loaded.use_rslora == config.use_rslora
    assert torch.equal(logits(fresh), logits(model))
    ours, theirs = adapter_state_dict(model), adapter_state_dict(fresh)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_save_load_round_trip_with_embedding_bias_and_copies(tmp_path):
    model = tiny_qwen2()
    config = LoraConfig(
        rank=4,
        targets=["embed_tokens", "q_proj", "k_proj"],
        bias="lora_only",
        modules_to_save=["lm_head"],
    )
    graftlm.inject(model, config)
    perturb_trainable(model)
    graftlm.save_adapter(model, tmp_path / "a")
    fresh = tiny_qwen2()
    graftlm.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh), logits(model))


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_merge_and_unload_returns_the_plain_model(arch):
    model = BUILDERS[arch]()
    graftlm.inject(model, LoraConfig(rank=4, alpha=8, targets=TARGETS[arch]))
    perturb_trainable(model)
    expected = logits(model)

    plain = graftlm.merge_and_unload(model)
    assert type(plain) is type(BUILDERS[arch]())
    assert not any(isinstance(m, LoraLayerBase) for m in plain.modules())
    assert not any("lora_" in k for k in plain.state_dict())
    assert not any(p.requires_grad for p in plain.parameters())
    assert not [attr for attr in vars(plain) if attr.startswith("graftlm_")]
    close(logits(plain), expected)

    fresh = BUILDERS[arch](seed=7)  # other weights, so the load must really overwrite them
    fresh.load_state_dict(plain.state_dict(), strict=True)
    close(logits(fresh), expected)


def test_tied_embeddings_merge_keeps_lm_head():
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    head = model.lm_head.weight.detach().clone()
    graftlm.inject(model, LoraConfig(rank=4, alpha=8, targets=["embed_tokens", "q_proj"]))
    perturb_trainable(model)
    unmerged = logits(model)

    graftlm.merge(model)
    close(logits(model), unmerged)
    assert torch.equal(model.lm_head.weight, head)  # the head did not receive the embedding update
    graftlm.unmerge(model)
    close(logits(model), unmerged)

    plain = graftlm.merge_and_unload(model)
    close(logits(plain), unmerged)
    assert torch.equal(plain.lm_head.weight, head)
    fresh = type(plain)(plain.config).eval()  # the merged config says the weights are untied now
    fresh.load_state_dict(plain.state_dict(), strict=True)
    close(logits(fresh), unmerged)


def test_bf16_base_keeps_its_dtype():
    model = tiny_llama().to(torch.bfloat16)
    graftlm.inject(model, LoraConfig(rank=4, alpha=8, targets=["embed_tokens", "q_proj", "o_proj"]))
    perturb_trainable(model)
    with torch.inference_mode():
        out = model(inputs()).logits
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)
    graftlm.merge(model)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        merged = model(inputs()).logits
    close(merged.float(), out.float(), atol=0.1)  # bf16 rounding of the merged weights


# -- several named adapters -------------------------------------------------------------------


def two_adapters() -> torch.nn.Module:
    """Adapter "a" on the embedding, q and v; "b" on every linear layer (q and v included)."""
    model = tiny_llama()
    graftlm.inject(
        model, LoraConfig(rank=4, alpha=8, targets=["embed_tokens", "q_proj", "v_proj"]), "a"
    )
    perturb_trainable(model, seed=1)
    summary = graftlm.inject(model, LoraConfig(rank=2, alpha=4, targets="all-linear"), "b")
    perturb_trainable(model, seed=2)
    # "b" adapts the 14 base linears, never the nn.Linear A/B inside "a"'s LoRA layers
    assert len(summary.modules) == 14
    assert all(".lora_" not in name for name, _, _ in summary.modules)
    return model


def test_set_delete_and_disable_adapters():
    model = two_adapters()
    base = logits(tiny_llama())
    assert graftlm.adapter_names(model) == ["a", "b"]
    assert graftlm.active_adapters(model) == ["b"]
    with_b = logits(model)
    graftlm.set_adapter(model, "a")
    with_a = logits(model)
    assert (with_a - with_b).abs().max() > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".a.weight", ".a")) for n in trainable), trainable

    with graftlm.disable_adapters(model):
        close(logits(model), base)
    close(logits(model), with_a)

    # both active: the updates add up, and merging both gives the same
    graftlm.set_adapter(model, ["a", "b"])
    both = logits(model)
    graftlm.merge(model)
    close(logits(model), both)
    with graftlm.disable_adapters(model):
        close(logits(model), base)
    close(logits(model), both)  # re-merged on exit
    graftlm.unmerge(model)

    graftlm.delete_adapter(model, "b")
    assert graftlm.adapter_names(model) == ["a"]
    assert not any(".b." in k for k in model.state_dict())
    close(logits(model), with_a)
    with pytest.raises(GraftError, match="'b'"):
        graftlm.set_adapter(model, "b")
    with pytest.raises(GraftError, match="already exists"):
        graftlm.inject(model, LoraConfig(rank=2, targets=["q_proj"]), "a")


def test_merging_an_inactive_embedding_adapter_keeps_tied_head():
    model = two_adapters()
    head = model.lm_head.weight.detach().clone()
    graftlm.set_adapter(model, "a")
    with_a = logits(model)
    graftlm.set_adapter(model, "b")
    graftlm.merge(model, ["a"])  # "a" (on the tied embedding) is not the active adapter
    assert torch.equal(model.lm_head.weight, head)
    graftlm.set_adapter(model, "a")
    close(logits(model), with_a)


def test_delete_merged_adapter_restores_base():
    model = two_adapters()
    graftlm.set_adapter(model, ["a", "b"])
    graftlm.merge(model)
    graftlm.delete_adapter(model, "a")
    graftlm.delete_adapter(model, "b")
    weights = lora_weight_names(model)
    fresh = dict(tiny_llama().named_parameters())
    for name, weight in weights.items():
        close(weight, fresh[name + ".weight"], atol=1e-6)


def test_per_row_adapters_equal_each_row_alone():
    model = two_adapters()
    ids = inputs(rows=4)
    names = ["a", "b", None, "a"]
    with graftlm.row_adapters(model, names):
        batched = logits(model, ids)
    for row, name in enumerate(names):
        if name is None:
            with graftlm.disable_adapters(model):
                alone = logits(model, ids[row : row + 1])
        else:
            graftlm.set_adapter(model, name)
            alone = logits(model, ids[row : row + 1])
        close(batched[row : row + 1], alone, atol=1e-4)  # batch size changes the rounding


def test_per_row_adapters_in_generate_with_left_padding():
    model = two_adapters()
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, helpers.TINY_VOCAB, (n,), generator=generator) for n in (5, 3, 4)]
    names = ["a", "b", None]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding with pad id 0
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode(), graftlm.row_adapters(model, names):
        batched = model.generate(ids, attention_mask=mask, **kwargs)[:, width:]
    for row, (prompt, name) in enumerate(zip(prompts, names)):
        with torch.inference_mode():
            if name is None:
                with graftlm.disable_adapters(model):
                    alone = model.generate(prompt[None], **kwargs)
            else:
                graftlm.set_adapter(model, name)
                alone = model.generate(prompt[None], **kwargs)
        assert torch.equal(batched[row], alone[0, len(prompt) :]), (row, name)


def test_per_row_adapters_refuse_modules_to_save():
    model = tiny_qwen2()
    graftlm.inject(model, LoraConfig(rank=2, targets=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(GraftError, match="modules_to_save"):
        with graftlm.row_adapters(model, ["default", None, None]):
            logits(model)


def test_per_row_adapters_refuse_merged_weights_and_unknown_names():
    model = two_adapters()
    with pytest.raises(GraftError, match="'c'"):
        with graftlm.row_adapters(model, ["a", "c"]):
            pass
    graftlm.merge(model)
    with pytest.raises(GraftError, match="unmerge"):
        with graftlm.row_adapters(model, ["a", "b", None]):
            logits(model)


# -- PiSSA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pissa_starts_at_the_base_output(arch):
    model = BUILDERS[arch]()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = logits(model)
    graftlm.inject(model, LoraConfig(rank=4, alpha=8, targets=TARGETS[arch], init="pissa"))
    close(logits(model), base, atol=1e-4)
    for name, layer in lora_layers(model):
        assert isinstance(layer, LoraLinear)
        original = originals[name + ".weight"].float()
        if layer.fan_in_fan_out:
            original = original.T
        residual = layer.weight.detach().float()
        residual = residual.T if layer.fan_in_fan_out else residual
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        product = layer.scaling["default"] * (lora_b @ lora_a)
        close(residual + product, original, atol=1e-4)  # W_res + s·BA == W
        u, s, vh = torch.linalg.svd(original, full_matrices=False)
        close(product, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-4)  # top-r SVD
        # the residual holds the rest of the spectrum
        close(torch.linalg.svdvals(residual)[: len(s) - 4], s[4:], atol=1e-4)


def test_pissa_saves_as_plain_lora_over_the_original_base(tmp_path):
    model = tiny_llama()
    graftlm.inject(model, LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"], init="pissa"))
    perturb_trainable(model)
    expected = logits(model)
    graftlm.save_adapter(model, tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16
    fresh = tiny_llama()
    graftlm.load_adapter(fresh, tmp_path / "p")
    close(logits(fresh), expected, atol=1e-4)


def test_deleting_a_pissa_adapter_restores_the_base():
    model = tiny_llama()
    base = logits(model)
    graftlm.inject(model, LoraConfig(rank=4, targets=["q_proj"], init="pissa"))
    graftlm.delete_adapter(model, "default")
    close(logits(model), base, atol=1e-4)


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(rank=0), ["rank", "0"]),
        (dict(rank=-2), ["rank", "-2"]),
        (dict(rank=2.5), ["rank", "2.5"]),
        (dict(alpha=0), ["alpha", "0"]),
        (dict(alpha=-1.0), ["alpha", "-1.0"]),
        (dict(dropout=1.5), ["dropout", "1.5"]),
        (dict(init="svd"), ["init", "'svd'"]),
        (dict(bias="some"), ["bias", "'some'"]),
        (dict(targets=[]), ["targets"]),
        (dict(targets="q_proj("), ["targets", "q_proj("]),
        (dict(rank_pattern={"q_proj": 0}), ["rank_pattern", "q_proj"]),
    ],
)
def test_bad_config_values_name_the_field(kwargs, words):
    with pytest.raises(GraftError) as info:
        LoraConfig(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_unknown_target_lists_the_linear_layers():
    model = tiny_llama()
    with pytest.raises(GraftError) as info:
        graftlm.inject(model, LoraConfig(targets=["qproj"]))
    message = str(info.value)
    assert "qproj" in message
    for name in TARGETS["llama"]:
        assert name in message
    assert not any(isinstance(m, LoraLayerBase) for m in model.modules())  # nothing changed


def test_a_string_of_plain_names_means_those_names():
    """`--targets q_proj` is the layer q_proj (as a PEFT regex it would match no whole name)."""
    for text, names in (("q_proj", ("q_proj",)), ("q_proj, v_proj", ("q_proj", "v_proj"))):
        assert LoraConfig(targets=text).targets == names
        model = tiny_llama()
        graftlm.inject(model, LoraConfig(targets=text))
        adapted = {
            n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLinear)
        }
        assert adapted == set(names)
    assert LoraConfig(targets=r".*\.(q|v)_proj").targets == r".*\.(q|v)_proj"  # a regex stays one


def test_regex_matching_nothing_is_an_error():
    with pytest.raises(GraftError, match=r"matched no layer"):
        graftlm.inject(tiny_llama(), LoraConfig(targets=r".*\.attention\.query"))
    with pytest.raises(GraftError, match=r"within layers \[5\]"):
        graftlm.inject(tiny_llama(), LoraConfig(targets=["q_proj"], layers=[5]))


def saved_adapter(build, folder, **config) -> None:
    model = build()
    graftlm.inject(model, LoraConfig(rank=4, **config))
    perturb_trainable(model)
    graftlm.save_adapter(model, folder)


def llama_of_other_width() -> torch.nn.Module:
    """A Llama like tiny_llama but hidden size 48 (helpers' builder fixes the hidden size)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=helpers.TINY_VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_adapter_of_another_architecture_is_refused(tmp_path):
    saved_adapter(tiny_gpt2, tmp_path / "g", targets=["c_attn"])
    with pytest.raises(GraftError) as info:
        graftlm.load_adapter(tiny_llama(), tmp_path / "g")
    assert "GPT2LMHeadModel" in str(info.value) and "LlamaForCausalLM" in str(info.value)
    # without graftlm's side file (an adapter from PEFT), the key names it
    (tmp_path / "g" / "graftlm.json").unlink()
    with pytest.raises(GraftError, match=r"transformer\.h\.0\.attn\.c_attn"):
        graftlm.load_adapter(tiny_llama(), tmp_path / "g")


@pytest.mark.parametrize("side_file", [True, False])
def test_adapter_for_other_hidden_size_names_key_and_shapes(tmp_path, side_file):
    saved_adapter(llama_of_other_width, tmp_path / "w", targets=["q_proj", "v_proj"])
    if not side_file:
        (tmp_path / "w" / "graftlm.json").unlink()
    with pytest.raises(GraftError) as info:
        graftlm.load_adapter(tiny_llama(), tmp_path / "w", force=True)
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj.lora_A" in message
    assert "(4, 64)" in message and "(4, 48)" in message  # expected, found


def test_adapter_for_other_hidden_size_fails_without_force_too(tmp_path):
    saved_adapter(llama_of_other_width, tmp_path / "w", targets=["q_proj"])
    with pytest.raises(GraftError, match=r"expected shape \(4, 64\), found \(4, 48\)"):
        graftlm.load_adapter(tiny_llama(), tmp_path / "w")


def test_fingerprint_mismatch_needs_force(tmp_path):
    saved_adapter(lambda: tiny_llama(seed=5), tmp_path / "f", targets=["q_proj"])
    model = tiny_llama()
    with pytest.raises(GraftError, match="force=True"):
        graftlm.load_adapter(model, tmp_path / "f")
    assert graftlm.adapter_names(model) == []  # nothing half-loaded
    graftlm.load_adapter(model, tmp_path / "f", force=True)
    assert graftlm.adapter_names(model) == ["default"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_file(tmp_path, damage):
    saved_adapter(tiny_llama, tmp_path / "c", targets=["q_proj"])
    weights = tmp_path / "c" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage]
    )
    with pytest.raises(GraftError, match=r"adapter_model\.safetensors.*(truncated|corrupt)"):
        graftlm.load_adapter(tiny_llama(), tmp_path / "c")


def test_bad_config_files(tmp_path):
    saved_adapter(tiny_llama, tmp_path / "j", targets=["q_proj"])
    config_path = tmp_path / "j" / "adapter_config.json"
    good = json.loads(config_path.read_text())

    del good["r"]
    config_path.write_text(json.dumps(good))
    with pytest.raises(GraftError, match=r"missing required field\(s\) r\b"):
        graftlm.load_adapter(tiny_llama(), tmp_path / "j")

    config_path.write_text('{"r": 4, "lora_alpha": ')
    with pytest.raises(GraftError, match=r"adapter_config\.json: not valid JSON"):
        graftlm.load_adapter(tiny_llama(), tmp_path / "j")

    with pytest.raises(GraftError, match=r"does not exist"):
        graftlm.load_adapter(tiny_llama(), tmp_path / "missing")


def test_nan_merge_is_refused_and_changes_nothing():
    model = tiny_llama()
    graftlm.inject(model, LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
    perturb_trainable(model)
    before = lora_weight_names(model)
    expected = logits(model)
    last = list(lora_layers(model))[-1][1]
    with torch.no_grad():
        last.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(GraftError, match=r"NaN"):
        graftlm.merge(model)
    after = lora_weight_names(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(not layer.merged_adapters for _, layer in lora_layers(model))
    with torch.no_grad():
        last.lora_B["default"].weight[0, 0] = 0.0
    assert torch.isfinite(logits(model)).all() and logits(model).shape == expected.shape


def test_decoding_path_equals_the_training_path(tiny_llama):
    """Without grad, LoraLinear adds scale·(x·Aᵀ)·Bᵀ with one in-place addmm: same outputs."""
    from graftlm.methods.lora.inject import inject, lora_layers, set_adapter

    inject(tiny_llama, LoraConfig(rank=4, alpha=8), "a")
    inject(tiny_llama, LoraConfig(rank=2, alpha=8, use_rslora=True), "b")
    set_adapter(tiny_llama, ["a", "b"])  # two unmerged adapters active at once
    with torch.no_grad():
        for _, layer in lora_layers(tiny_llama):
            for b in layer.lora_B.values():
                b.weight.normal_(std=0.2)
    ids = torch.randint(3, 200, (2, 7))
    with torch.enable_grad():
        expected = tiny_llama(ids).logits.detach()
    with torch.inference_mode():
        got = tiny_llama(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        set_adapter(tiny_llama, "a")
        assert not torch.allclose(tiny_llama(ids).logits, got)  # "b" really contributed
