"""AdaLoRA (graftlm.methods.adalora.method) against PEFT 0.21 as the oracle, and its budget invariants.

Both directions of the folder format (logits and greedy tokens), the training dynamics step by
step (importance, budget, masks, orthogonality penalty) against PEFT's own loop, the budget
reaching target_r through the real training loop, masks that stay, merging, resume, and errors.
Tiny random models, fp32.
"""

from __future__ import annotations

import json
import os
import signal

import helpers
import pytest
import torch
from safetensors.torch import load_file, save_file
from visible_models import BUILDERS, one_thread, tiny_llama  # noqa: F401

from graftlm.adapters.io import load_any, save_trained
from graftlm.errors import GraftError
from graftlm.methods.adalora import method as adalora
from graftlm.methods.adalora.budget import TrainingHooks, budget_at, default_schedule
from graftlm.methods.adalora.method import AdaLoraConfig, AdaLoraLinear, svd_layers
from graftlm.methods.lora.inject import merge, unmerge

peft = pytest.importorskip("peft")  # the oracle; installed with the `test` extra
pytestmark = [
    # PEFT's generic pattern check does not know AdaLoRA's "<module>.lora_E" keys (it warns on
    # its own folders too), and it takes a pruned (0-triplet) module for an unsharded tensor
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys"),
    pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape"),
]

ATOL = 1e-5
KINDS = ("lora_A", "lora_E", "lora_B")


def batch(step: int = 0, rows: int = 2, width: int = 9) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randint(3, helpers.TINY_VOCAB, (rows, width), generator=generator)


def logits(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.inference_mode():
        return model(batch() if ids is None else ids).logits.float()


def greedy(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            batch(), max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None
        )


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def train_steps(model, hooks: TrainingHooks, steps: range, lr: float = 3e-2, opt=None):
    """The training loop's order: loss + extra_loss, backward, step, after_step, zero_grad."""
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in steps:
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss + hooks.extra_loss()
        loss.backward()
        opt.step()
        hooks.after_step(step)
        opt.zero_grad()
    return opt


def trained(arch: str, targets, total: int = 12, init_r: int = 6, target_r: int = 3, seed=0):
    """A tiny model with an AdaLoRA adapter trained through its whole budget schedule."""
    torch.manual_seed(seed)
    model = BUILDERS[arch]()
    adalora.inject(model, AdaLoraConfig(init_r=init_r, target_r=target_r, alpha=8, targets=targets))
    hooks = TrainingHooks(model, None, total)
    train_steps(model, hooks, range(total))
    return model.eval(), hooks


def peft_config(**overrides) -> peft.AdaLoraConfig:
    values = dict(
        task_type="CAUSAL_LM",
        init_r=6,
        target_r=3,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        total_step=12,
        tinit=1,
        tfinal=2,
        deltaT=1,
    )
    values.update(overrides)
    return peft.AdaLoraConfig(**values)


def copy_from_peft(model: torch.nn.Module, other) -> None:
    """Give graftlm's adapter PEFT's (random) initial triplets."""
    inner = other.base_model.model
    with torch.no_grad():
        for module_name, layer in svd_layers(model, "default"):
            source = inner.get_submodule(module_name)
            for kind in KINDS:
                getattr(layer, kind)["default"].copy_(getattr(source, kind)["default"])


def peft_pattern(other) -> dict[str, tuple[bool, ...]]:
    pattern = other.peft_config["default"].rank_pattern
    return {k.replace(".default", ""): tuple(v) for k, v in pattern.items()}


# -- the folder format, both ways -------------------------------------------------------------------

SAVE_CASES = {
    "llama_q_v": ("llama", ["q_proj", "v_proj"]),
    "llama_all_linear": ("llama", "all-linear"),
    "qwen2_biases": ("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "gpt2_conv1d": ("gpt2", ["c_attn", "c_proj", "c_fc"]),
}


@pytest.mark.parametrize("case", sorted(SAVE_CASES))
def test_graftlm_adapter_loads_in_peft(case, tmp_path):
    arch, targets = SAVE_CASES[case]
    model, hooks = trained(arch, targets)
    expected = logits(model)
    assert (expected - logits(BUILDERS[arch]())).abs().max() > 1e-2  # the adapter does something
    adalora.save(model, tmp_path / "a", None)

    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["peft_type"] == "ADALORA" and data["init_r"] == 6 and data["target_r"] == 3
    assert data["total_step"] == 12
    pattern = {k: tuple(v) for k, v in data["rank_pattern"].items()}
    assert pattern == hooks.config.rank_pattern
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    kept = sum(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_E"))
    assert kept == 3 * len(pattern) == sum(sum(v) for v in pattern.values())

    other = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "a").eval()
    close(logits(other), expected)
    assert torch.equal(greedy(other), greedy(model))

    # merged weights agree too
    merge(model)
    theirs = other.merge_and_unload().state_dict()
    ours = model.state_dict()
    for key, value in theirs.items():
        close(ours[key], value)


def test_never_pruned_adapter_saves_full_rank_and_loads_in_peft(tmp_path):
    model = tiny_llama()
    adalora.inject(model, AdaLoraConfig(init_r=4, target_r=2, alpha=8, targets=["q_proj"]))
    with torch.no_grad():
        for _, layer in svd_layers(model):
            layer.lora_E["default"].normal_()
    expected = logits(model)
    adalora.save(model, tmp_path / "a", None)
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["rank_pattern"] is None
    assert data["total_step"] > data["tinit"] + data["tfinal"]  # PEFT refuses it otherwise
    other = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    close(logits(other), expected)


def peft_trained(tmp_path, rank_zero: str | None = None):
    """PEFT trains its own AdaLoRA adapter (12 steps) and saves it; `rank_zero` prunes a module."""
    torch.manual_seed(3)
    other = peft.get_peft_model(tiny_llama(), peft_config())
    opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=3e-2)
    for step in range(12):
        ids = batch(step)
        other(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        other.base_model.update_and_allocate(step)
        opt.zero_grad()
    config = other.peft_config["default"]
    if rank_zero:
        key = next(k for k in config.rank_pattern if rank_zero in k)
        config.rank_pattern[key] = [False] * len(config.rank_pattern[key])
        allocator = other.base_model.rankallocator
        allocator.mask_using_rank_pattern(other.base_model.model, config.rank_pattern)
    other.eval()
    other.save_pretrained(tmp_path / "p")
    return other


@pytest.mark.parametrize("rank_zero", [None, "layers.1.self_attn.q_proj"])
def test_peft_adapter_loads_in_graftlm(rank_zero, tmp_path):
    other = peft_trained(tmp_path, rank_zero)
    expected = logits(other)
    model = tiny_llama()
    config = adalora.load(model, tmp_path / "p")
    assert config.init_r == 6 and config.target_r == 3 and config.rank_pattern
    ranks = {name: layer.ranks["default"] for name, layer in svd_layers(model)}
    assert ranks == {k[: -len(".lora_E")]: sum(v) for k, v in config.rank_pattern.items()}
    if rank_zero:
        assert ranks[f"model.{rank_zero}"] == 0
    close(logits(model), expected)
    assert torch.equal(greedy(model), greedy(other))

    # saving it again gives PEFT's file back
    adalora.save(model, tmp_path / "again", None)
    theirs = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_pipeline_save_trained_and_load_any(tmp_path):
    model, _ = trained("llama", "all-linear")
    expected = logits(model)
    save_trained(model, tmp_path / "a", "adalora", training={"steps": 12})
    graft = json.loads((tmp_path / "a" / "graftlm.json").read_text())
    assert graft["method"] == "adalora" and graft["base_fingerprint"]
    fresh = tiny_llama()
    assert load_any(fresh, tmp_path / "a") == "adalora"
    close(logits(fresh.eval()), expected)


# -- training dynamics against PEFT ---------------------------------------------------------------


def test_training_matches_peft_step_by_step():
    """Same start, same batches, same optimizer: PEFT's loop (orth penalty in its forward,
    update_and_allocate after the step) and graftlm's hooks give the same losses, masks and
    weights at every step."""
    total = 12
    torch.manual_seed(0)
    other = peft.get_peft_model(tiny_llama(), peft_config(total_step=total))
    model = tiny_llama()
    config = AdaLoraConfig(
        init_r=6, target_r=3, alpha=8, targets=["q_proj", "v_proj", "down_proj"]
    ).replace(total_step=total, tinit=1, tfinal=2)
    adalora.inject(model, config)
    copy_from_peft(model, other)
    hooks = TrainingHooks(model, None, total)
    ours = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    theirs = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=3e-2)
    inner = other.base_model.model
    for step in range(total):
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss + hooks.extra_loss()
        loss.backward()
        ours.step()
        hooks.after_step(step)
        ours.zero_grad()
        peft_loss = other(input_ids=ids, labels=ids).loss
        peft_loss.backward()
        theirs.step()
        other.base_model.update_and_allocate(step)
        theirs.zero_grad()

        close(loss.detach(), peft_loss.detach())
        if other.peft_config["default"].rank_pattern is not None:
            assert hooks.config.rank_pattern == peft_pattern(other), f"step {step}"
        for module_name, layer in svd_layers(model):
            for kind in KINDS:
                expected = getattr(inner.get_submodule(module_name), kind)["default"]
                close(getattr(layer, kind)["default"].detach(), expected.detach())
    assert sum(hooks.ranks().values()) == 3 * len(hooks.layers)


def test_orthogonal_penalty_is_peft_formula():
    """PEFT adds orth_reg_weight · mean ||·||_F to the loss in its forward; so do the hooks."""
    torch.manual_seed(1)
    other = peft.get_peft_model(tiny_llama(), peft_config(orth_reg_weight=0.7))
    model = tiny_llama()
    adalora.inject(
        model,
        AdaLoraConfig(
            init_r=6,
            target_r=3,
            alpha=8,
            targets=["q_proj", "v_proj", "down_proj"],
            orth_reg_weight=0.7,
        ),
    )
    copy_from_peft(model, other)
    ids = batch()
    with torch.no_grad():
        with_penalty = other(input_ids=ids, labels=ids).loss
        other.peft_config["default"].orth_reg_weight = 0.0
        without = other(input_ids=ids, labels=ids).loss
    penalty = TrainingHooks(model, None, 10).extra_loss()
    assert penalty.item() > 0.1
    close(penalty.detach(), with_penalty - without)


# -- the budget ---------------------------------------------------------------------------------------


def test_schedule_always_leaves_a_budget_phase():
    for total in range(1, 200):
        tinit, tfinal = default_schedule(total)
        assert 0 <= tinit < total - tfinal  # PEFT's own check on the saved config
        if total >= 2:
            assert tfinal >= 1  # so the final allocation (to target_r) happens within the run
    kwargs = dict(init_budget=120, target_budget=80, tinit=5, tfinal=10, total_step=50, delta_t=1)
    budgets = [budget_at(s, **kwargs)[0] for s in range(50)]
    assert budgets[:6] == [120] * 6 and budgets[40:] == [80] * 10
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))


def test_budget_reaches_target_and_masks_stay_zero():
    """All linear layers of a tiny model, 30 steps through the real hooks: the kept triplets
    follow the budget down to target_r per matrix on average; masked λ are zero after each
    allocation and stay zero through the final phase, while kept ones keep training."""
    torch.manual_seed(0)
    model = tiny_llama()
    adalora.inject(model, AdaLoraConfig(init_r=6, target_r=2, alpha=8, targets="all-linear"))
    total = 30
    hooks = TrainingHooks(model, None, total)
    final = total - hooks.config.tfinal
    n = len(hooks.layers)
    assert n == 14 and hooks.init_budget == 6 * n and hooks.target_budget == 2 * n
    opt = None
    frozen_pattern = None
    for step in range(total):
        opt = train_steps(model, hooks, range(step, step + 1), opt=opt)
        budget, masked_now = hooks.budget(step)
        if masked_now and step <= final:
            assert sum(hooks.ranks().values()) <= budget
        for module_name, layer in hooks.layers:
            keep = hooks.kept.get(module_name)
            if keep is not None:
                assert (layer.lora_E["default"][~keep] == 0).all(), (step, module_name)
        if step == final:
            frozen_pattern = hooks.config.rank_pattern
        if step > final:
            assert hooks.config.rank_pattern == frozen_pattern  # no more re-allocation
    assert sum(hooks.ranks().values()) == hooks.target_budget
    kept_values = torch.cat(
        [layer.lora_E["default"][hooks.kept[m]].view(-1) for m, layer in hooks.layers]
    )
    assert (kept_values != 0).all()


def test_train_loop_end_to_end_reaches_target_r(tmp_path, tiny_model_dir):
    """`graftlm.train.loop` with --method adalora: the saved adapter holds target_r triplets per
    matrix on average, with its rank_pattern, and inspect shows the final ranks."""
    from helpers import base_cfg

    from graftlm.adapters.inspect import describe, format_description
    from graftlm.train.loop import train

    cfg = base_cfg(tmp_path, tiny_model_dir, method="adalora", rank=2, init_rank=4, steps=12)
    result = train(cfg, progress=False)
    folder = tmp_path / "out"
    data = json.loads((folder / "adapter_config.json").read_text())
    assert data["peft_type"] == "ADALORA" and data["total_step"] == 12
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    ranks = {k: t.shape[0] for k, t in tensors.items() if k.endswith(".lora_E")}
    assert sum(ranks.values()) == 2 * len(ranks) == 2 * 14
    assert result.trainable_parameters > sum(t.numel() for t in tensors.values())  # pruned
    facts = describe(folder)
    assert facts["method"] == "adalora" and sum(facts["final_ranks"].values()) == 28
    text = format_description(facts)
    assert "rank budget    28 of 56 triplets kept" in text and "block 1" in text


def test_resume_restores_importance_and_masks(tmp_path, tiny_model_dir, monkeypatch):
    """A run stopped mid-budget and resumed writes the adapter an uninterrupted run writes:
    the checkpoint carries the hooks' importance averages and masks."""
    from helpers import base_cfg

    from graftlm.train.loop import train

    common = dict(method="adalora", rank=2, init_rank=4, steps=16, save_every=100)
    (tmp_path / "ref").mkdir()
    (tmp_path / "cut").mkdir()
    train(base_cfg(tmp_path / "ref", tiny_model_dir, **common), progress=False)

    original = TrainingHooks.after_step

    def stop_at_5(self, step):
        original(self, step)
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the loop checkpoints after this step and stops

    monkeypatch.setattr(TrainingHooks, "after_step", stop_at_5)
    cut = base_cfg(tmp_path / "cut", tiny_model_dir, **common)
    assert train(cut, progress=False).interrupted
    state = load_file(str(tmp_path / "cut" / "out" / "checkpoint" / "state.safetensors"))
    assert any(k.startswith("hooks/avg_ipt/") for k in state)
    assert any(k.startswith("hooks/kept/") for k in state)
    monkeypatch.setattr(TrainingHooks, "after_step", original)
    train(cut.__class__(**{**cut.to_dict(), "resume": True}), progress=False)

    ref = load_file(str(tmp_path / "ref" / "out" / "adapter_model.safetensors"))
    res = load_file(str(tmp_path / "cut" / "out" / "adapter_model.safetensors"))
    assert sorted(ref) == sorted(res)
    for key in ref:
        assert torch.equal(ref[key], res[key]), key


# -- the layer -------------------------------------------------------------------------------------


def test_fresh_adapter_is_identity_and_only_triplets_train():
    model = tiny_llama()
    expected = logits(model)
    summary = adalora.inject(model, AdaLoraConfig(init_r=4, target_r=2, targets="all-linear"))
    close(logits(model), expected, atol=0)  # Λ = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.rsplit(".", 2)[-2] in KINDS and n.endswith(".default") for n in trainable
    )
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_merge_equals_unmerged_is_idempotent_and_unmerge_restores():
    model, _ = trained("llama", "all-linear")
    base_weights = {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}
    expected = logits(model)
    merge(model)
    close(logits(model), expected)
    merge(model)  # twice: no change
    close(logits(model), expected)
    unmerge(model)
    close(logits(model), expected)
    merged_once = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    for name, value in merged_once.items():
        close(value.detach(), base_weights[name])
    adalora.merge(model)
    close(logits(model), expected)


def test_two_adapters_per_row(tmp_path):
    """row_adapters: each row of a batch through its own AdaLoRA adapter (or none)."""
    from graftlm.adapters.switch import row_adapters, set_adapter

    first, _ = trained("llama", ["q_proj", "v_proj"], seed=1)
    second, _ = trained("llama", ["q_proj", "v_proj"], seed=2)
    adalora.save(first, tmp_path / "one", None)
    adalora.save(second, tmp_path / "two", None)
    model = tiny_llama()
    adalora.load(model, tmp_path / "one", "one")
    adalora.load(model, tmp_path / "two", "two")
    ids = batch(rows=3)
    with torch.inference_mode():
        with row_adapters(model, ["one", "two", None]):
            mixed = model(ids).logits
        set_adapter(model, "one")
        close(mixed[0], model(ids[:1]).logits[0])
        set_adapter(model, "two")
        close(mixed[1], model(ids[1:2]).logits[0])
    close(mixed[2], logits(tiny_llama(), ids[2:3])[0])


# -- errors ----------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model, _ = trained("llama", ["q_proj", "v_proj"])
    adalora.save(model, tmp_path / "a", None)
    return tmp_path / "a"


def rewrite(folder, *, config=None, tensors=None):
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(folder / "adapter_model.safetensors"))


def test_errors_for_bad_folders(saved, tmp_path):
    def error(folder) -> str:
        with pytest.raises(GraftError) as info:
            adalora.load(tiny_llama(), folder)
        return str(info.value)

    assert "does not exist" in error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "adapter_config.json: not found" in error(tmp_path / "empty")

    config = json.loads((saved / "adapter_config.json").read_text())
    tensors = load_file(str(saved / "adapter_model.safetensors"))
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"

    rewrite(saved, config={**config, "peft_type": "LORA"})
    assert "is not ADALORA" in error(saved)
    rewrite(saved, config={k: v for k, v in config.items() if k != "init_r"})
    assert "missing required field(s) init_r" in error(saved)
    rewrite(saved, config={**config, "use_dora": True})
    assert "use_dora=True is not supported for AdaLoRA" in error(saved)
    rewrite(saved, config={**config, "init_r": 1, "target_r": 1})
    assert "more than init_r 1" in error(saved)
    rewrite(saved, config=config)

    rewrite(saved, tensors={k: v for k, v in tensors.items() if k != f"{q0}.lora_E"})
    message = error(saved)
    assert "incomplete triplets" in message and "q_proj lacks lora_E" in message
    rewrite(saved, tensors={**tensors, f"{q0}.lora_B": torch.zeros(64, 99)})
    assert f"{q0}.lora_B: expected shape" in error(saved)
    rewrite(saved, tensors={**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)})
    assert "not AdaLoRA tensors" in error(saved)
    moved = {k.replace("layers.0.", "layers.7."): v for k, v in tensors.items()}
    rewrite(saved, tensors=moved)
    assert "does not have: the adapter was trained on another architecture" in error(saved)
    (saved / "adapter_model.safetensors").write_bytes(b"garbage")
    assert "truncated or corrupt" in error(saved)


def test_config_errors_name_the_field(tiny_model_dir):
    from graftlm.train.config import TrainConfig

    with pytest.raises(GraftError, match=r"target_r \(16\) should not exceed init_r \(12\)"):
        AdaLoraConfig(init_r=12, target_r=16)
    with pytest.raises(GraftError, match="beta1 should be in"):
        AdaLoraConfig(beta1=1.0)
    with pytest.raises(GraftError, match="leave no step"):
        AdaLoraConfig(total_step=10, tinit=5, tfinal=5)
    cfg = TrainConfig(data="d", out="o", method="adalora", use_rslora=True).with_method_defaults()
    with pytest.raises(GraftError, match="use_rslora is not defined for AdaLoRA"):
        adalora.attach(tiny_llama(), cfg)
    # an unset init_rank follows the rank (1.5x); one given below the rank is an error
    cfg = TrainConfig(data="d", out="o", method="adalora", rank=16, init_rank=12)
    with pytest.raises(GraftError, match="rank 16 .* exceeds init_rank 12.* --init-rank 24"):
        adalora.attach(tiny_llama(), cfg)
    model = tiny_llama()
    import graftlm

    graftlm.inject(model, graftlm.LoraConfig(rank=2, targets=["q_proj"]))
    with pytest.raises(GraftError, match="holds LoRA adapters"):
        adalora.inject(model, AdaLoraConfig(targets=["q_proj"]), "ada")
    model = tiny_llama()
    adalora.inject(model, AdaLoraConfig(init_r=2, target_r=1, targets=["q_proj"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, AdaLoraLinear)
    with pytest.raises(GraftError, match="holds AdaLoRA adapters"):
        graftlm.inject(model, graftlm.LoraConfig(rank=2, targets=["q_proj"]), "lora")


# -- the built-in model, real data (slow) -----------------------------------------------------------


def test_real_data_gives_uneven_ranks_and_peft_generates_the_same_text(smollm2, tmp_path):
    """A few steps on ticket data: the budget lands unevenly across modules, and the saved
    adapter generates the same text in PEFT as in graftlm (batched, left-padded, KV cache)."""
    import copy

    from graftlm.data.dataset import collate, load_dataset, prompt_for_generation, read_rows
    from graftlm.infer.generate import SamplingConfig, generate

    base, tokenizer = smollm2
    model = copy.deepcopy(base)
    examples, _ = load_dataset("examples/data/tickets/train.jsonl", tokenizer, 256)
    targets = ["q_proj", "v_proj", "down_proj"]
    adalora.inject(model, AdaLoraConfig(init_r=4, target_r=2, alpha=16, targets=targets))
    total = 8
    hooks = TrainingHooks(model, None, total)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(total):
        rows = collate(examples[4 * step : 4 * step + 4], tokenizer.pad_token_id)
        loss = model(
            input_ids=rows["input_ids"],
            attention_mask=rows["attention_mask"],
            labels=rows["labels"],
        ).loss
        (loss + hooks.extra_loss()).backward()
        opt.step()
        hooks.after_step(step)
        opt.zero_grad()
    model.eval()
    ranks = hooks.ranks()
    assert sum(ranks.values()) == 2 * len(ranks) == 2 * 90
    assert len(set(ranks.values())) > 1, "importance should favour some matrices over others"

    adalora.save(model, tmp_path / "a", None)
    other = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    test_rows, _ = read_rows("examples/data/tickets/test.jsonl")
    prompts = [prompt_for_generation(row, tokenizer) for row in test_rows[:3]]
    short = SamplingConfig(max_new_tokens=12)
    ours = generate(model, tokenizer, prompts, sampling=short)
    theirs = generate(other, tokenizer, prompts, sampling=short)
    assert ours == theirs
