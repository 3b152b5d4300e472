"""Bottleneck adapters: start at the base, sit where documented, save/load, train, generate, errors.

Tiny random models, fp32, eval mode. "Trained" adapters are simulated by seeded noise.
"""

from __future__ import annotations

import json

import helpers
import pytest
import torch
from safetensors.torch import load_file, save_file
from visible_models import BUILDERS, one_thread, perturb_trainable, tiny_llama  # noqa: F401

from graftlm.adapters.io import load_any, save_trained
from graftlm.adapters.switch import row_adapters
from graftlm.errors import GraftError
from graftlm.methods.bottleneck import method as bn
from graftlm.train.config import TrainConfig


def inputs() -> torch.Tensor:
    return torch.randint(3, helpers.TINY_VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs()).logits.float()


def trained(arch: str = "llama", **config) -> torch.nn.Module:
    model = BUILDERS[arch]()
    bn.add_bottleneck(model, bn.BottleneckConfig(size=8, **config))
    perturb_trainable(model)
    return model.eval()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_fresh_adapter_is_the_base(arch):
    model = BUILDERS[arch]()
    base = logits(model)
    bn.add_bottleneck(model, bn.BottleneckConfig(size=8))
    torch.testing.assert_close(logits(model), base, atol=0, rtol=0)


# the documented sites: the last linear layer of each block's attention and MLP
SITES = {
    "llama": ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"),
    "qwen2": ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"),
    "gpt2": ("transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"),
}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("placement", ["both", "mlp"])
def test_placement_puts_blocks_where_documented(arch, placement):
    model = BUILDERS[arch]()
    summary = bn.add_bottleneck(model, bn.BottleneckConfig(size=8, placement=placement))
    attention, mlp = SITES[arch]
    expected = []
    for i in range(2):
        if placement == "both":
            expected.append(attention.format(i=i))
        expected.append(mlp.format(i=i))
    assert [n for n, _ in bn.adapter_layers(model)] == expected
    d = 64
    assert summary.trainable == len(expected) * (2 * d * 8 + 8 + d)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_save_load_round_trip_gives_the_same_logits(arch, tmp_path):
    base = logits(BUILDERS[arch]())
    model = trained(arch)
    expected = logits(model)
    assert (expected - base).abs().max() > 1e-2
    tensors = bn.save(model, tmp_path / "a", "some/base")
    fresh = BUILDERS[arch]()
    bn.load(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh), expected, atol=0, rtol=0)
    assert sorted(load_file(tmp_path / "a" / "adapter_model.safetensors")) == sorted(tensors)


def test_file_format_is_the_documented_one(tmp_path):
    bn.save(trained(placement="mlp"), tmp_path / "a", "some/base")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config == {
        "peft_type": "BOTTLENECK",
        "task_type": "CAUSAL_LM",
        "format_version": 1,
        "base_model_name_or_path": "some/base",
        "bottleneck_size": 8,
        "placement": "mlp",
        "non_linearity": "silu",
        "scaling": 1.0,
        "dropout": 0.0,
        "hidden_size": 64,
        "target_modules": ["mlp.down_proj"],
        "num_adapters": 2,
    }
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.adapter_"
    assert {k: tuple(v.shape) for k, v in tensors.items() if k.startswith(key)} == {
        key + "down.weight": (8, 64),
        key + "down.bias": (8,),
        key + "up.weight": (64, 8),
        key + "up.bias": (64,),
    }
    assert len(tensors) == 8 and all(t.dtype == torch.float32 for t in tensors.values())


def test_training_changes_only_adapter_params_through_the_loop_path(tmp_path):
    """One AdamW step through the inner decoder (the loop's path): up and down both move."""
    model = tiny_llama()
    bn.attach(model, TrainConfig(data="d", out="o", method="bottleneck", bottleneck_size=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):  # up starts at zero, so down gets a gradient from the second step on
        model.model(input_ids=inputs()).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter_down.default." in n or ".adapter_up.default." in n for n in changed)
    assert any(".adapter_down." in n for n in changed) and any(".adapter_up." in n for n in changed)


def test_defaults_and_cli_settings_reach_the_adapter():
    cfg = TrainConfig(data="d", out="o", method="bottleneck").with_method_defaults()
    model = tiny_llama()
    bn.attach(model, cfg)
    layers = bn.adapter_layers(model)
    size = bn.DEFAULTS["bottleneck_size"]
    assert len(layers) == 4 and layers[0][1].adapter_down["default"].out_features == size
    cfg = TrainConfig(
        data="d", out="o", method="bottleneck", bottleneck_size=4, bottleneck_placement="mlp"
    )
    model = tiny_llama()
    bn.attach(model, cfg)
    sizes = [layer.adapter_down["default"].out_features for _, layer in bn.adapter_layers(model)]
    assert sizes == [4, 4]


def test_bf16_base_with_fp32_adapter_runs_and_trains_under_autocast():
    """A bf16 base (the loop's compute dtype where the CPU/GPU has bf16): the adapter is
    created in fp32, computes in bf16 under autocast, and its fp32 parameters get gradients."""
    model = tiny_llama().to(torch.bfloat16)
    bn.add_bottleneck(model, bn.BottleneckConfig(size=8))
    perturb_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=inputs()).last_hidden_state
    assert hidden.dtype == torch.bfloat16
    hidden.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    out = logits(model)  # no autocast: bf16 hidden states, fp32 adapter
    assert torch.isfinite(out).all()


def test_round_trip_through_adapter_io(tmp_path):
    model = trained()
    expected = logits(model)
    save_trained(model, tmp_path / "t", "bottleneck", training={"steps": 1})
    graft = json.loads((tmp_path / "t" / "graftlm.json").read_text())
    assert graft["method"] == "bottleneck" and graft["trainable_parameters"] == 4 * (
        2 * 64 * 8 + 72
    )
    fresh = tiny_llama()
    assert load_any(fresh, tmp_path / "t") == "bottleneck"
    torch.testing.assert_close(logits(fresh), expected, atol=0, rtol=0)


def test_batched_left_padded_generation_equals_one_at_a_time():
    from graftlm.infer.generate import SamplingConfig, generate

    model, tokenizer = trained(), helpers.tiny_tokenizer()
    prompts = [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\na much longer prompt than that<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nmid-sized one<|im_end|>\n<|im_start|>assistant\n",
    ]
    sampling = SamplingConfig(max_new_tokens=24)
    batched = generate(model, tokenizer, prompts, sampling=sampling, batch_size=3)
    single = [generate(model, tokenizer, [p], sampling=sampling)[0] for p in prompts]
    assert batched == single


def test_named_adapters_per_row_and_unload_restores_the_base(tmp_path):
    """Two adapters (sizes and placements differ) on one base: `row_adapters` gives each row
    its own adapter's output, None rows the base's; unloading both restores the base modules."""

    base_model = tiny_llama()
    base = logits(base_model)
    first, second = trained(), trained(placement="mlp")
    perturb_trainable(second, seed=5)
    expected = {"a": logits(first), "b": logits(second), None: base}
    bn.save(first, tmp_path / "a", None)
    bn.save(second, tmp_path / "b", None)

    model = tiny_llama()
    bn.load(model, tmp_path / "a", "a")
    bn.load(model, tmp_path / "b", "b")
    assert bn.BOTTLENECK_ADAPTERS.active_adapter(model) == "b"
    torch.testing.assert_close(logits(model), expected["b"])
    for names in (["a", "b"], ["b", None], [None, "a"]):
        with row_adapters(model, names):
            out = logits(model)
        for row, name in enumerate(names):
            torch.testing.assert_close(out[row], expected[name][row], atol=1e-5, rtol=0)
    bn.unload(model, "b")
    assert bn.BOTTLENECK_ADAPTERS.active_adapter(model) == "a"
    torch.testing.assert_close(logits(model), expected["a"])
    bn.unload(model, "a")
    assert not bn.adapter_layers(model) and not bn.BOTTLENECK_ADAPTERS.adapters(model)
    torch.testing.assert_close(logits(model), base, atol=0, rtol=0)
    assert sorted(model.state_dict()) == sorted(base_model.state_dict())
    with pytest.raises(GraftError, match="no bottleneck adapter named 'a'"):
        bn.unload(model, "a")


def test_serving_engine_mixes_bottleneck_ia3_and_base_rows_as_each_alone(tmp_path):
    """The registry loads a bottleneck and an (IA)³ adapter onto one base (the IA3 vectors sit
    on down_proj, which the bottleneck adapter wraps); the engine's batched rows each give what
    their adapter gives alone."""
    import threading

    from graftlm.adapters.io import load_any
    from graftlm.infer.generate import SamplingConfig, generate
    from graftlm.methods.ia3 import method as ia3
    from graftlm.serve.adapter_pool import AdapterRegistry
    from graftlm.serve.scheduler import Engine, Request

    bn.save(trained(), tmp_path / "a", None)
    other = tiny_llama()
    ia3.add_ia3(other, ia3.default_spec(other, None))
    perturb_trainable(other, seed=2)
    ia3.save(other, tmp_path / "b", None)
    folders = {"a": tmp_path / "a", "b": tmp_path / "b"}

    tokenizer = helpers.tiny_tokenizer()
    model = tiny_llama()
    registry = AdapterRegistry(model)
    for name, folder in folders.items():
        registry.register(name, folder)
    engine = Engine(model, tokenizer, registry, max_batch=4)
    sampling = SamplingConfig(max_new_tokens=6)
    prompts = ["a", "hello there", "the quick brown fox", "xy", "ok", "tell me more"]
    row_names = ["a", "b", None, "b", "a", None]
    answers: dict[int, str] = {}
    done = threading.Event()

    def listener(row):
        def on_event(event):
            if event.kind in ("done", "error"):
                answers[row] = event.text if event.kind == "done" else repr(event.error)
                if len(answers) == len(prompts):
                    done.set()

        return on_event

    engine.start()
    try:
        for row, (prompt, name) in enumerate(zip(prompts, row_names)):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            engine.submit(Request(prompt_ids, name, sampling, listener(row)))
        assert done.wait(120)
    finally:
        engine.stop()
    for row, (prompt, name) in enumerate(zip(prompts, row_names)):
        alone = tiny_llama()
        if name is not None:
            load_any(alone, folders[name], name)
        assert [answers[row]] == generate(alone, tokenizer, [prompt], sampling=sampling)


def test_merge_is_refused():
    assert bn.MERGEABLE is False
    with pytest.raises(GraftError, match="cannot be merged"):
        bn.merge(trained())


# -- errors ------------------------------------------------------------------------------------


def test_config_errors_name_the_field():
    with pytest.raises(GraftError, match="bottleneck_size.*0"):
        bn.BottleneckConfig(size=0)
    with pytest.raises(GraftError, match="placement.*'attn'"):
        bn.BottleneckConfig(placement="attn")
    with pytest.raises(GraftError, match="non_linearity.*'swishy'"):
        bn.BottleneckConfig(activation="swishy")


def test_taken_or_bad_adapter_names_are_refused(tmp_path):
    model = trained()
    with pytest.raises(GraftError, match="'default' already exists"):
        bn.add_bottleneck(model, bn.BottleneckConfig(size=4))
    bn.save(model, tmp_path / "a", None)
    with pytest.raises(GraftError, match="'default' already exists"):
        bn.load(model, tmp_path / "a")
    with pytest.raises(GraftError, match="letters, digits"):
        bn.add_bottleneck(model, bn.BottleneckConfig(size=4), "a.b")


def test_model_without_decoder_blocks():
    with pytest.raises(GraftError, match="no decoder blocks"):
        bn.add_bottleneck(torch.nn.Sequential(torch.nn.Linear(4, 4)), bn.BottleneckConfig())


def _saved(tmp_path, **config):
    folder = tmp_path / "a"
    bn.save(trained(**config), folder, None)
    return folder, load_file(folder / "adapter_model.safetensors")


def test_wrong_shape_names_file_key_and_shapes(tmp_path):
    folder, tensors = _saved(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.o_proj.adapter_up.weight"
    tensors[key] = torch.zeros(64, 16)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(GraftError) as err:
        bn.load(tiny_llama(), folder)
    message = str(err.value)
    assert "adapter_model.safetensors" in message and key in message
    assert "(64, 8)" in message and "(64, 16)" in message


def test_missing_tensor_unknown_module_and_wrong_placement(tmp_path):
    folder, tensors = _saved(tmp_path)
    key = "base_model.model.model.layers.1.mlp.down_proj.adapter_down.bias"
    del tensors[key]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(
        GraftError, match=r"layers\.1\.mlp\.down_proj has no \['adapter_down\.bias'\]"
    ):
        bn.load(tiny_llama(), folder)

    folder, tensors = _saved(tmp_path)
    for leaf in bn.TENSORS:
        tensors[f"base_model.model.model.layers.5.mlp.down_proj.{leaf}"] = torch.zeros(1)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(GraftError, match=r"does not have.*layers\.5\.mlp\.down_proj"):
        bn.load(tiny_llama(), folder)

    folder, _ = _saved(tmp_path, placement="both")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "placement": "mlp"}))
    with pytest.raises(
        GraftError, match=r"modules it does not select: \['model\.layers\.0\.self_attn\.o_proj'"
    ):
        bn.load(tiny_llama(), folder)


def test_bad_config_files(tmp_path):
    folder, tensors = _saved(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**config, "bottleneck_size": 0}))
    with pytest.raises(GraftError, match="adapter_config.json: bottleneck_size should be"):
        bn.load(tiny_llama(), folder)
    path.write_text(json.dumps({k: v for k, v in config.items() if k != "placement"}))
    with pytest.raises(GraftError, match=r"missing field\(s\) \['placement'\]"):
        bn.load(tiny_llama(), folder)
    path.write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(GraftError, match="format_version 2"):
        bn.load(tiny_llama(), folder)
    path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(GraftError, match="peft_type is 'IA3'"):
        bn.load(tiny_llama(), folder)
    path.write_text(json.dumps(config))
    tensors["base_model.model.lm_head.weight"] = torch.zeros(2)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(GraftError, match="unexpected keys.*lm_head.weight"):
        bn.load(tiny_llama(), folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(GraftError, match="adapter_model.safetensors: not found"):
        bn.load(tiny_llama(), folder)


def test_describe(tmp_path):
    folder, _ = _saved(tmp_path, placement="mlp")
    assert bn.describe(folder)["method_facts"]["bottleneck"] == "size 8, silu, placement 'mlp'"


# -- the built-in model (slow) -----------------------------------------------------------------


@pytest.mark.slow
def test_trained_on_the_built_in_model_generates_the_same_text_batched(smollm2, tmp_path):
    """`graftlm train --method bottleneck` a few steps; `graftlm generate`'s batched,
    left-padded text equals one prompt at a time, and differs from the base model's."""
    from pathlib import Path

    from graftlm.cli.parser import main as cli_main
    from graftlm.data.dataset import prompt_for_generation
    from graftlm.infer.generate import SamplingConfig, load_for_inference
    from graftlm.infer.generate import generate as run_generate

    def generate(model, tokenizer, prompts, batch_size):
        sampling = SamplingConfig(max_new_tokens=12)
        return run_generate(model, tokenizer, prompts, sampling=sampling, batch_size=batch_size)

    data = Path(__file__).resolve().parents[2] / "examples" / "data" / "tickets"
    train = tmp_path / "train.jsonl"
    train.write_text("".join((data / "train.jsonl").read_text().splitlines(keepends=True)[:48]))
    out = tmp_path / "bn"
    args = ["train", "--method", "bottleneck", "--data", str(train), "--out", str(out)]
    assert cli_main([*args, "--steps", "6", "--batch-size", "8", "--quiet"]) == 0
    model, tokenizer = load_for_inference(None, {"default": str(out)})
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()[:5]]
    prompts = [prompt_for_generation({"messages": r["messages"][:-1]}, tokenizer) for r in rows]
    batched = generate(model, tokenizer, prompts, batch_size=5)
    single = [generate(model, tokenizer, [p], batch_size=1)[0] for p in prompts]
    assert batched == single
    base, _ = smollm2
    assert batched != generate(base, tokenizer, prompts, batch_size=5)
