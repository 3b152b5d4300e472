"""(IA)³: PEFT 0.21 as the oracle both ways, merge/unmerge invariants, the training path, errors.

Tiny random models, fp32, eval mode. "Trained" vectors are simulated by seeded noise around one.
"""

from __future__ import annotations

import json

import helpers
import pytest
import torch
from safetensors.torch import load_file, save_file
from visible_models import BUILDERS, one_thread, perturb_trainable, tiny_llama  # noqa: F401

from graftlm.adapters.io import load_any, save_trained
from graftlm.adapters.switch import row_adapters, set_adapter
from graftlm.errors import GraftError
from graftlm.methods.ia3 import method as ia3
from graftlm.train.config import TrainConfig

peft = pytest.importorskip("peft")

ATOL = 1e-5


def inputs() -> torch.Tensor:
    return torch.randint(3, helpers.TINY_VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs()).logits.float()


def greedy(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            inputs(), max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None
        )


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The (merged) weights under the plain model's keys, as `graftlm merge` copies them."""
    return {
        k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "ia3_l" not in k
    }


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def trained(arch: str = "llama", targets: str | None = None) -> torch.nn.Module:
    model = BUILDERS[arch]()
    ia3.add_ia3(model, ia3.default_spec(model, targets))
    perturb_trainable(model)
    return model


# (arch, graftlm targets, the same layers in PEFT's IA3Config terms; None = PEFT's defaults)
CASES = {
    "llama_default": ("llama", None, {}),
    "llama_all_linear": (
        "llama",
        "all-linear",
        dict(target_modules="all-linear", feedforward_modules=["down_proj"]),
    ),
    "qwen2_bias": ("qwen2", None, {}),  # q_proj/v_proj have biases: the vector scales them too
    "gpt2_conv1d": ("gpt2", None, {}),  # Conv1D weight [in, out]; feedforward mlp.c_proj
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_graftlm_adapter_loads_in_peft(case, tmp_path):
    arch, targets, _ = CASES[case]
    base = logits(BUILDERS[arch]())
    model = trained(arch, targets)
    expected = logits(model)
    assert (expected - base).abs().max() > 1e-2  # the vectors do something
    ia3.save(model, tmp_path / "a", None)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"]
    other = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "a").eval()
    close(logits(other), expected)
    assert torch.equal(greedy(other), greedy(model))
    # PEFT's merge folds the same vectors into the same weights as ours
    ia3.merge(model)
    ours = plain_state(model)
    theirs = other.merge_and_unload().state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        close(ours[key], theirs[key])


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_graftlm(case, tmp_path):
    arch, _, extra = CASES[case]
    other = peft.get_peft_model(
        BUILDERS[arch](), peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False, **extra)
    ).eval()
    expected = logits(other)
    other.save_pretrained(tmp_path / "p")
    model = BUILDERS[arch]()
    ia3.load(model, tmp_path / "p")
    close(logits(model), expected)
    assert torch.equal(greedy(model), greedy(other))


def test_saved_keys_and_shapes_are_peft_s(tmp_path):
    model = trained()
    tensors = ia3.save(model, tmp_path / "a", "some/base")
    on_disk = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sorted(on_disk) == sorted(tensors)
    k = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    down = "base_model.model.model.layers.1.mlp.down_proj.ia3_l"
    assert on_disk[k].shape == (32, 1)  # [out, 1]: 2 kv heads x 16
    assert on_disk[down].shape == (1, 128)  # [1, in]: intermediate size
    assert len(on_disk) == 6 and all(t.dtype == torch.float32 for t in on_disk.values())
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert config["feedforward_modules"] == ["down_proj"]
    assert config["base_model_name_or_path"] == "some/base"


def test_fresh_adapter_is_the_base_and_only_vectors_train():
    model = tiny_llama()
    base = logits(model)
    summary = ia3.attach(model, TrainConfig(data="d", out="o", method="ia3"))
    close(logits(model), base, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".ia3_l.default") for n in trainable)
    assert summary.trainable == 2 * (32 + 32 + 128)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_bf16_base_with_fp32_vectors_runs_and_trains_under_autocast():
    model = tiny_llama().to(torch.bfloat16)
    ia3.attach(model, TrainConfig(data="d", out="o", method="ia3"))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=inputs()).last_hidden_state
    assert hidden.dtype == torch.bfloat16
    hidden.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(logits(model)).all()


def adapted_kinds(model) -> set[str]:
    """The last name segments of the layers that carry (IA)³ vectors ('k_proj', ...)."""
    return {name.rsplit(".", 1)[-1] for name, _ in ia3.ia3_layers(model)}


def test_targets_from_the_cli_string():
    model = tiny_llama()
    ia3.attach(model, TrainConfig(data="d", out="o", method="ia3", targets="q_proj,down_proj"))
    layers = dict(ia3.ia3_layers(model))
    assert adapted_kinds(model) == {"down_proj", "q_proj"}
    assert layers["model.layers.0.mlp.down_proj"].feedforward == {"default": True}
    assert layers["model.layers.0.self_attn.q_proj"].feedforward == {"default": False}


def test_the_training_recipe_adapts_every_linear_layer_and_the_api_default_is_peft_s():
    model = tiny_llama()
    cfg = TrainConfig(data="d", out="o", method="ia3").with_method_defaults()
    ia3.attach(model, cfg)
    every = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert adapted_kinds(model) == every
    other = tiny_llama()
    ia3.add_ia3(other, ia3.default_spec(other, None))  # the library's default stays PEFT's
    assert adapted_kinds(other) == {"k_proj", "v_proj", "down_proj"}


def test_merge_equals_forward_is_idempotent_and_unmerge_restores():
    model = trained("qwen2")  # biases: merged into, and restored
    expected = logits(model)
    base_weights = {n: t.clone() for n, t in model.state_dict().items() if "ia3_l" not in n}
    ia3.merge(model)
    close(logits(model), expected)
    merged = {n: t.clone() for n, t in model.state_dict().items()}
    ia3.merge(model)  # a second merge changes nothing
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, merged[name])
    ia3.unmerge(model)
    close(logits(model), expected)
    for name, tensor in base_weights.items():
        close(model.state_dict()[name], tensor, atol=1e-6)


def test_merge_refuses_nan_and_changes_nothing():
    model = trained()
    layers = ia3.ia3_layers(model)
    with torch.no_grad():
        layers[-1][1].ia3_l["default"][0, 0] = float("nan")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(GraftError, match="NaN"):
        ia3.merge(model)
    assert all(layer.merged is None for _, layer in layers)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.nan_to_num(), before[name].nan_to_num())


def test_merge_of_a_second_adapter_is_refused_while_one_is_merged(tmp_path):
    ia3.save(trained(), tmp_path / "a", None)
    model = tiny_llama()
    ia3.load(model, tmp_path / "a", "a")
    ia3.load(model, tmp_path / "a", "b")
    ia3.merge(model)  # "b", the active one
    merged = {n: t.clone() for n, t in model.state_dict().items()}
    set_adapter(model, "a")
    with pytest.raises(GraftError, match="'b' is merged; unmerge"):
        ia3.merge(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, merged[name])


def test_train_loop_path_and_round_trip_through_adapter_io(tmp_path):
    """Forward through the inner decoder (the loop's path), save_trained, load_any."""
    model = tiny_llama()
    ia3.attach(model, TrainConfig(data="d", out="o", method="ia3"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hidden = model.model(input_ids=inputs()).last_hidden_state
    hidden.pow(2).mean().backward()
    optimizer.step()
    assert any((layer.ia3_l["default"] != 1).any() for _, layer in ia3.ia3_layers(model))
    model.eval()
    expected = logits(model)
    save_trained(model, tmp_path / "t", "ia3")
    assert json.loads((tmp_path / "t" / "graftlm.json").read_text())["method"] == "ia3"
    fresh = tiny_llama()
    assert load_any(fresh, tmp_path / "t") == "ia3"
    close(logits(fresh), expected, atol=0)
    with pytest.raises(GraftError, match="trained on a different base"):
        load_any(tiny_llama(seed=1), tmp_path / "t")


def test_batched_left_padded_generation_equals_one_at_a_time():
    from graftlm.infer.generate import SamplingConfig, generate

    model, tokenizer = trained(), helpers.tiny_tokenizer()
    model.eval()
    prompts = ["<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>user\na longer prompt here\n"]
    sampling = SamplingConfig(max_new_tokens=24)
    batched = generate(model, tokenizer, prompts, sampling=sampling, batch_size=2)
    single = [generate(model, tokenizer, [p], sampling=sampling)[0] for p in prompts]
    assert batched == single


def test_named_adapters_per_row_and_unload_restores_the_base(tmp_path):
    """Two adapters on one base (one on other layers): `row_adapters` gives each row its own
    adapter's output, None rows the base's; unloading both restores the base modules."""

    base_model = tiny_llama()
    base = logits(base_model)
    first = trained()
    second = tiny_llama()
    ia3.add_ia3(second, ia3.default_spec(second, "q_proj,o_proj,down_proj"))
    perturb_trainable(second, seed=3)
    expected = {"a": logits(first), "b": logits(second), None: base}
    ia3.save(first, tmp_path / "a", None)
    ia3.save(second, tmp_path / "b", None)

    model = tiny_llama()
    ia3.load(model, tmp_path / "a", "a")
    ia3.load(model, tmp_path / "b", "b")
    assert ia3.IA3_ADAPTERS.active_adapter(model) == "b"
    close(logits(model), expected["b"])
    for names in (["a", "b"], ["b", None], [None, "a"]):
        with row_adapters(model, names):
            out = logits(model)
        for row, name in enumerate(names):
            close(out[row], expected[name][row])
    set_adapter(model, "a")
    close(logits(model), expected["a"])
    ia3.unload(model, "a")
    assert ia3.IA3_ADAPTERS.active_adapter(model) == "b"
    close(logits(model), expected["b"])
    ia3.unload(model, "b")
    assert not ia3.ia3_layers(model) and not ia3.IA3_ADAPTERS.adapters(model)
    close(logits(model), base, atol=0)
    assert sorted(model.state_dict()) == sorted(base_model.state_dict())
    with pytest.raises(GraftError, match="no \\(IA\\)³ adapter named 'b'"):
        ia3.unload(model, "b")


# -- errors ------------------------------------------------------------------------------------


def test_targets_matching_nothing_names_the_layers():
    with pytest.raises(GraftError, match="matched no layer.*k_proj"):
        ia3.add_ia3(tiny_llama(), ia3.default_spec(tiny_llama(), "qkv"))


def test_taken_or_bad_adapter_names_are_refused(tmp_path):
    model = trained()
    with pytest.raises(GraftError, match="'default' already exists"):
        ia3.add_ia3(model, ia3.default_spec(model, None))
    ia3.save(model, tmp_path / "a", None)
    with pytest.raises(GraftError, match="'default' already exists"):
        ia3.load(model, tmp_path / "a")
    with pytest.raises(GraftError, match="letters, digits"):
        ia3.add_ia3(model, ia3.default_spec(model, None), "a.b")


def _saved(tmp_path) -> tuple:
    folder = tmp_path / "a"
    ia3.save(trained(), folder, None)
    return folder, load_file(folder / "adapter_model.safetensors")


def test_wrong_shape_names_file_key_and_shapes(tmp_path):
    folder, tensors = _saved(tmp_path)
    key = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    tensors[key] = torch.ones(128, 1)  # [out, 1] where feedforward wants [1, in]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(GraftError) as err:
        ia3.load(tiny_llama(), folder)
    message = str(err.value)
    assert "adapter_model.safetensors" in message and key in message
    assert "(1, 128)" in message and "(128, 1)" in message


def test_unknown_and_missing_modules_are_listed(tmp_path):
    folder, tensors = _saved(tmp_path)
    tensors["base_model.model.model.layers.7.self_attn.k_proj.ia3_l"] = torch.ones(32, 1)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(GraftError, match=r"does not have.*layers\.7\.self_attn\.k_proj"):
        ia3.load(tiny_llama(), folder)
    del tensors["base_model.model.model.layers.7.self_attn.k_proj.ia3_l"]
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.ia3_l"]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(
        GraftError, match=r"no tensors for \['model\.layers\.1\.self_attn\.v_proj'\]"
    ):
        ia3.load(tiny_llama(), folder)


def test_bad_folders(tmp_path):
    folder, tensors = _saved(tmp_path)
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.ones(2, 2)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(GraftError, match="unexpected keys.*up_proj.lora_A"):
        ia3.load(tiny_llama(), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(GraftError, match="peft_type is 'LORA'"):
        ia3.load(tiny_llama(), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(GraftError, match="adapter_config.json: not valid JSON"):
        ia3.load(tiny_llama(), folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(GraftError, match="adapter_config.json: not found"):
        ia3.load(tiny_llama(), folder)
    ia3.save(trained(), tmp_path / "b", None)
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(GraftError, match="truncated or corrupt"):
        ia3.load(tiny_llama(), tmp_path / "b")


def test_describe(tmp_path):
    ia3.save(trained(), tmp_path / "a", None)
    facts = ia3.describe(tmp_path / "a")["method_facts"]
    assert facts["vectors"].startswith("4 on layer outputs, 2 on layer inputs")


# -- the built-in model (slow) -----------------------------------------------------------------


def greedy_text(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=2
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_trained_on_the_built_in_model_peft_generates_the_same_text(smollm2_copy, tmp_path):
    """`graftlm train --method ia3` a few steps, `graftlm generate` (batched, left padding);
    PEFT loads the folder and greedily generates the same text one prompt at a time."""
    from pathlib import Path

    from graftlm.cli.parser import main as cli_main
    from graftlm.data.dataset import prompt_for_generation

    data = Path(__file__).resolve().parents[2] / "examples" / "data" / "tickets"
    train = tmp_path / "train.jsonl"
    train.write_text("".join((data / "train.jsonl").read_text().splitlines(keepends=True)[:48]))
    out = tmp_path / "ia3"
    args = ["train", "--method", "ia3", "--data", str(train), "--out", str(out), "--steps", "6"]
    assert cli_main([*args, "--batch-size", "8", "--quiet"]) == 0
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()[:4]]
    rows = [{"messages": row["messages"][:-1]} for row in rows]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = tmp_path / "preds.jsonl"
    args = ["generate", "--adapter", str(out), "--input", str(tmp_path / "in.jsonl")]
    assert cli_main([*args, "--output", str(preds), "--max-new-tokens", "8"]) == 0
    outputs = [json.loads(line)["output"] for line in preds.read_text().splitlines()]

    model, tokenizer = smollm2_copy
    base_texts = [greedy_text(model, tokenizer, prompt_for_generation(r, tokenizer)) for r in rows]
    peft_model = peft.PeftModel.from_pretrained(model, str(out)).eval()
    peft_texts = [
        greedy_text(peft_model, tokenizer, prompt_for_generation(r, tokenizer)) for r in rows
    ]
    assert peft_texts == outputs
    assert outputs != base_texts, "6 steps at the default lr should change some greedy answers"
