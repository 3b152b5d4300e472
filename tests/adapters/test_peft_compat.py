"""graftlm against Hugging Face PEFT 0.21 as the oracle, in both directions.

For each LoRA flavour: (a) an adapter graftlm trains (simulated by seeded perturbation) and
saves loads in `PeftModel.from_pretrained` with the same logits; (b) an adapter PEFT saves
loads in graftlm with the same logits; (c) both merge to the same plain weights; and greedy
generation agrees token for token. Tiny random models, fp32, eval mode.
"""

from __future__ import annotations

import helpers
import pytest
import torch
from visible_models import (  # noqa: F401
    BUILDERS,
    one_thread,
    perturb_trainable,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
)

import graftlm
from graftlm.methods.lora.config import LoraConfig

peft = pytest.importorskip("peft")  # the oracle; installed with the `test` extra

ATOL = 1e-5


def inputs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, helpers.TINY_VOCAB, (2, 7), generator=generator)


def logits(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs() if ids is None else ids).logits.float()


def greedy(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            inputs(), max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None
        )


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# -- the cases: (model, graftlm config, the same adapter in PEFT's terms) ----------------------

CASES = {
    "q_v": ("llama", dict(rank=4, alpha=8, targets=["q_proj", "v_proj"]), {}),
    "all_linear": ("llama", dict(rank=4, alpha=8, targets="all-linear"), {}),
    "rslora": ("llama", dict(rank=4, alpha=8, targets=["q_proj", "v_proj"], use_rslora=True), {}),
    "rank_pattern": (
        "llama",
        dict(
            rank=4,
            alpha=8,
            targets="all-linear",
            rank_pattern={"v_proj": 2, "mlp.down_proj": 6},
            alpha_pattern={"q_proj": 3},
        ),
        {},
    ),
    "embedding": ("qwen2", dict(rank=4, alpha=8, targets=["embed_tokens", "q_proj"]), {}),
    "bias_lora_only": (
        "qwen2",
        dict(rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj"], bias="lora_only"),
        {},
    ),
    "bias_all": ("qwen2", dict(rank=4, alpha=8, targets=["q_proj", "v_proj"], bias="all"), {}),
    "modules_to_save": (
        "qwen2",  # untied lm_head
        dict(rank=4, alpha=8, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        {},
    ),
    "gpt2_conv1d": (
        "gpt2",
        dict(rank=4, alpha=8, targets=["c_attn", "c_proj", "c_fc"]),
        dict(fan_in_fan_out=True),
    ),
    "layers": ("llama", dict(rank=4, alpha=8, targets=["q_proj", "v_proj"], layers=[1]), {}),
    "exclude": (
        "llama",
        dict(rank=4, alpha=8, targets="all-linear", exclude=["o_proj", "gate_proj"]),
        {},
    ),
    "regex": (
        "llama",
        dict(
            rank=4,
            alpha=8,
            targets=r".*\.(q|k|v)_proj",
            exclude=r"model\.layers\.0\.self_attn\.k_proj",
        ),
        {},
    ),
    # PEFT ignores layers_to_transform for a regex target; graftlm honours it and then writes
    # the exact module names, so PEFT still adapts only layer 1
    "regex_layers": ("llama", dict(rank=4, alpha=8, targets=r".*\.(q|v)_proj", layers=[1]), {}),
}


def peft_config(graft: dict, extra: dict) -> peft.LoraConfig:
    """The PEFT LoraConfig equivalent to graftlm keyword arguments `graft`."""
    config = LoraConfig(**graft)
    targets = config.targets if isinstance(config.targets, str) else list(config.targets)
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=targets,
        exclude_modules=list(config.exclude) if config.exclude else None,
        layers_to_transform=list(config.layers) if config.layers else None,
        rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern),
        use_rslora=config.use_rslora,
        bias=config.bias,
        modules_to_save=list(config.modules_to_save) or None,
        init_lora_weights=False,  # B random too, so the adapter is not a no-op
        **extra,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_graftlm_adapter_loads_in_peft(case, tmp_path):
    arch, graft, _ = CASES[case]
    build = BUILDERS[arch]
    model = build()
    base_logits = logits(model)
    graftlm.inject(model, LoraConfig(**graft))
    perturb_trainable(model)
    expected = logits(model)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter does something
    graftlm.save_adapter(model, tmp_path / "a")

    other = peft.PeftModel.from_pretrained(build(), tmp_path / "a").eval()
    close(logits(other), expected)
    assert torch.equal(greedy(other), greedy(model))

    # (c) merged weights agree: graftlm merge_and_unload vs PEFT merge_and_unload
    ours = graftlm.merge_and_unload(model).state_dict()
    theirs = other.merge_and_unload().state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        close(ours[key], theirs[key])
    close(logits(model), expected)


@pytest.mark.parametrize("case", sorted(set(CASES) - {"regex_layers"}))  # PEFT refuses that one
def test_peft_adapter_loads_in_graftlm(case, tmp_path):
    arch, graft, extra = CASES[case]
    build = BUILDERS[arch]
    other = peft.get_peft_model(build(), peft_config(graft, extra))
    perturb_trainable(other, seed=1)
    other.eval()
    expected = logits(other)
    other.save_pretrained(tmp_path / "p")

    model = build()
    config = graftlm.load_adapter(model, tmp_path / "p")
    assert config.rank == graft["rank"]
    close(logits(model), expected)
    assert torch.equal(greedy(model), greedy(other))

    ours = graftlm.merge_and_unload(model).state_dict()
    theirs = other.merge_and_unload().state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        close(ours[key], theirs[key])


# -- beyond one adapter per config ----------------------------------------------------------


def test_tied_embedding_adapter_and_merge(tmp_path):
    """LoRA on the embedding of a tied model: PEFT's merge also changes the tied lm_head (its
    merged model no longer matches its own unmerged output); graftlm unties first."""
    model = tiny_llama()
    graftlm.inject(model, LoraConfig(rank=4, alpha=8, targets=["embed_tokens", "q_proj"]))
    perturb_trainable(model)
    expected = logits(model)
    graftlm.save_adapter(model, tmp_path / "t")
    other = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "t").eval()
    close(logits(other), expected)
    close(logits(graftlm.merge_and_unload(model)), logits(other))


def test_second_adapter_saves_like_a_single_one(tmp_path):
    """An all-linear adapter added next to another must adapt the base layers only."""
    model = tiny_llama()
    graftlm.inject(model, LoraConfig(rank=4, targets=["q_proj", "v_proj"]), "first")
    perturb_trainable(model, seed=1)
    graftlm.inject(model, LoraConfig(rank=2, alpha=4, targets="all-linear"), "second")
    perturb_trainable(model, seed=2)
    expected = logits(model)
    graftlm.save_adapter(model, tmp_path / "s", "second")
    other = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "s").eval()
    close(logits(other), expected)


def test_two_peft_adapters_by_name(tmp_path):
    for index, targets in enumerate((["q_proj", "v_proj"], "all-linear")):
        other = peft.get_peft_model(tiny_llama(), peft_config(dict(rank=2, targets=targets), {}))
        perturb_trainable(other, seed=index)
        other.save_pretrained(tmp_path / str(index))
    other = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "0", adapter_name="x").eval()
    other.load_adapter(tmp_path / "1", adapter_name="y")

    model = tiny_llama()
    graftlm.load_adapter(model, tmp_path / "0", name="x")
    graftlm.load_adapter(model, tmp_path / "1", name="y")
    for name in ("x", "y"):
        other.set_adapter(name)
        graftlm.set_adapter(model, name)
        close(logits(model), logits(other))
    with graftlm.row_adapters(model, ["y", "x"]):
        batched = logits(model)
    for row, name in enumerate(["y", "x"]):
        other.set_adapter(name)
        # a one-row batch rounds differently from a two-row one: 1e-4, not 1e-5
        close(batched[row : row + 1], logits(other, inputs()[row : row + 1]), atol=1e-4)


# -- PiSSA ------------------------------------------------------------------------------------


def test_pissa_init_matches_peft():
    config = dict(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    model = tiny_llama()
    graftlm.inject(model, LoraConfig(init="pissa", **config))
    peft_cfg = peft_config(config, {})
    peft_cfg.init_lora_weights = "pissa"
    other = peft.get_peft_model(tiny_llama(), peft_cfg).eval()
    ours = model.state_dict()
    theirs = {
        k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
        for k, v in other.state_dict().items()
    }
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        close(ours[key], theirs[key], atol=1e-5)
    close(logits(model), logits(other))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pissa_adapter_loads_in_peft_on_the_original_base(arch, tmp_path):
    model = BUILDERS[arch]()
    base = logits(model)
    graftlm.inject(model, LoraConfig(rank=4, alpha=8, targets="all-linear", init="pissa"))
    close(logits(model), base, atol=1e-4)
    perturb_trainable(model)  # training changes A and B away from their SVD start
    expected = logits(model)
    graftlm.save_adapter(model, tmp_path / "p")
    other = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "p").eval()
    assert other.peft_config["default"].r == 8
    close(logits(other), expected, atol=1e-4)
    assert torch.equal(greedy(other), greedy(model))
