"""`graftlm combine` against PEFT 0.21's `add_weighted_adapter` as the oracle.

Two random LoRA adapters (non-zero B) are made and saved with PEFT on tiny Llama and GPT-2
(Conv1D, fan_in_fan_out) models; graftlm combines the folders without a model, PEFT combines
the same adapters loaded on the base, and the tensors must be equal (the svd rules: B·A within
1e-5, where SVD sign choices may differ), DARE's masks included for the same seed.
"""

from __future__ import annotations

import json
import math

import helpers
import pytest
import torch
from safetensors.torch import load_file

import graftlm
from graftlm.adapters.combine import HOWS, combine_adapters
from graftlm.cli.parser import main
from graftlm.errors import GraftError

peft = pytest.importorskip("peft")  # the oracle; installed with the `test` extra

WEIGHTS = [0.7, -0.4]
DENSITY = 0.5
SEED = 11
PEFT_NAME = "combined"

# Llama: different alphas, an alpha_pattern, rsLoRA on neither, an embedding on both, and
# o_proj adapted by b only (PEFT combines over the union of the targets)
LLAMA_ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
              alpha_pattern={"v_proj": 4}),
    "b": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"]),
    "c": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]),
}  # fmt: skip
GPT2_ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    "b": dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    "c": dict(r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True),
}
ADAPTERS = {"llama": LLAMA_ADAPTERS, "gpt2": GPT2_ADAPTERS}


def ids() -> torch.Tensor:
    return torch.randint(3, helpers.TINY_VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids()).logits.float()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def folders(request, tmp_path_factory):
    """(kind, {name: folder}) of three PEFT-saved adapters with random A and B."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"combine-{kind}")
    out = {}
    for seed, (name, fields) in enumerate(ADAPTERS[kind].items()):
        torch.manual_seed(100 + seed)
        # init_lora_weights=False: A and B keep nn.Linear's random init, so B is not zero
        config = peft.LoraConfig(init_lora_weights=False, **fields)
        model = peft.get_peft_model(helpers.tiny_model_factory(kind), config)
        model.save_pretrained(root / name)
        out[name] = root / name
    return kind, out


def peft_combined(kind, folders, names, weights, how, **kwargs):
    """PEFT's model holding the adapters `names` and their combination PEFT_NAME (active)."""
    model = peft.PeftModel.from_pretrained(
        helpers.tiny_model_factory(kind), folders[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    torch.manual_seed(SEED)
    model.add_weighted_adapter(names, weights, PEFT_NAME, combination_type=how, **kwargs)
    model.set_adapter(PEFT_NAME)
    return model.eval()


def peft_tensors(model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=PEFT_NAME)


def products(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module: B @ A} of a LoRA weights file."""
    out = {}
    for key, a in tensors.items():
        for kind_a, kind_b in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):  # fmt: skip
            if key.endswith(kind_a):
                out[key[: -len(kind_a)]] = tensors[key[: -len(kind_a)] + kind_b] @ a
    return out


def check_same(kind, folders, tmp_path, names, weights, how, **kwargs):
    """graftlm's folder equals PEFT's combination: tensors, config, logits loaded in PEFT."""
    peft_kwargs = dict(kwargs)
    peft_kwargs.pop("seed", None)
    expected_model = peft_combined(kind, folders, names, weights, how, **peft_kwargs)
    expected = peft_tensors(expected_model)
    out = combine_adapters(
        {n: folders[n] for n in names},
        weights,
        tmp_path / "out",
        how=how,
        seed=SEED,
        base=helpers.tiny_model_factory(kind),
        **_graft_kwargs(kwargs),
    )
    found = load_file(out / "adapter_model.safetensors")
    assert sorted(found) == sorted(expected)
    if how.endswith("svd"):
        want, got = products(expected), products(found)
        assert sorted(want) == sorted(got)
        for module in want:
            torch.testing.assert_close(got[module], want[module], atol=1e-5, rtol=0)
    else:
        for key in expected:
            assert torch.equal(found[key], expected[key]), key
    config = json.loads((out / "adapter_config.json").read_text())
    peft_config = expected_model.peft_config[PEFT_NAME]
    assert config["r"] == peft_config.r and config["lora_alpha"] == peft_config.lora_alpha
    assert set(config["target_modules"]) == set(peft_config.target_modules)
    loaded = peft.PeftModel.from_pretrained(helpers.tiny_model_factory(kind), out).eval()
    torch.testing.assert_close(logits(loaded), logits(expected_model), atol=1e-5, rtol=0)
    return out


def _graft_kwargs(kwargs):
    names = {"svd_full_matrices": "svd_full_matrices", "majority_sign_method": "majority_sign"}
    return {names.get(k, k): v for k, v in kwargs.items()}


@pytest.mark.parametrize("how", HOWS)
def test_every_rule_equals_peft(folders, tmp_path, how):
    kind, paths = folders
    kwargs = {"density": DENSITY} if how.removesuffix("_svd") not in ("linear", "cat", "svd") else {}
    check_same(kind, paths, tmp_path, ["a", "b"], WEIGHTS, how, **kwargs)


@pytest.mark.parametrize(
    "how, kwargs",
    [
        ("cat", {}),
        ("svd", {"svd_rank": 3, "svd_clamp": 0.9}),
        ("svd", {"svd_full_matrices": False}),
        ("dare_ties_svd", {"density": 0.3, "majority_sign_method": "frequency"}),
        ("ties", {"density": 1.0, "majority_sign_method": "frequency"}),
    ],
)
def test_options_and_ranks_equal_peft(folders, tmp_path, how, kwargs):
    """Adapters of ranks 4 and 2 (cat sums them, svd takes the largest or svd_rank), and the
    rules' options."""
    kind, paths = folders
    names = ["a", "c"] if how in ("cat", "svd") else ["a", "b"]
    check_same(kind, paths, tmp_path, names, [1.5, 0.5], how, **kwargs)


def test_one_adapter_is_linear(folders, tmp_path):
    kind, paths = folders
    out = check_same(kind, paths, tmp_path, ["b"], [0.5], "ties", density=0.5)
    assert json.loads((out / "graftlm.json").read_text())["combined"]["how"] == "linear"


def test_dare_without_base_warns_and_still_seeds(folders, tmp_path, caplog):
    """Without the base's module order DARE's masks are other draws; the same seed still
    gives the same folder."""
    kind, paths = folders
    runs = []
    for i in range(2):
        out = combine_adapters(
            {"a": paths["a"], "b": paths["b"]},
            [0.5, 0.5],
            tmp_path / f"o{i}",
            how="dare_linear",
            density=0.5,
            seed=3,
        )
        runs.append(load_file(out / "adapter_model.safetensors"))
    assert "module name order" in caplog.text  # tiny models' folders name no local base
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
