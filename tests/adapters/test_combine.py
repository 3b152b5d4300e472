"""`graftlm combine` against PEFT 0.21's `add_weighted_adapter` as the oracle.

Two random LoRA adapters (non-zero B) are made and saved with PEFT on tiny Llama and GPT-2
(Conv1D, fan_in_fan_out) models; graftlm combines the folders without a model, PEFT combines
the same adapters loaded on the base, and the tensors must be equal (the svd rules: B·A within
1e-5, where SVD sign choices may differ), DARE's masks included for the same seed.
"""

from __future__ import annotations

import json
import re
import shutil

import helpers
import pytest
import torch
from safetensors.torch import load_file
from visible_models import one_thread, perturb_trainable  # noqa: F401  (one_thread: autouse)

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


def save_peft_adapters(kind: str, root) -> dict:
    """{name: folder} of the ADAPTERS[kind], saved by PEFT with random A and B."""
    out = {}
    for seed, (name, fields) in enumerate(ADAPTERS[kind].items()):
        torch.manual_seed(100 + seed)
        # init_lora_weights=False: A and B keep nn.Linear's random init, so B is not zero
        config = peft.LoraConfig(init_lora_weights=False, **fields)
        model = peft.get_peft_model(helpers.tiny_model_factory(kind), config)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def folders(request, tmp_path_factory):
    """(kind, {name: folder}) of three PEFT-saved adapters with random A and B."""
    kind = request.param
    return kind, save_peft_adapters(kind, tmp_path_factory.mktemp(f"combine-{kind}"))


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
    kwargs = (
        {"density": DENSITY} if how.removesuffix("_svd") not in ("linear", "cat", "svd") else {}
    )
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


# -- graftlm's own folders, through the CLI ----------------------------------------------------


def graftlm_adapter(model_dir, folder, seed: int, alpha: int):
    """A LoRA adapter graftlm saves (its keys, config and graftlm.json), random A and B."""
    model, _ = graftlm.load_model(model_dir)
    graftlm.inject(
        model, graftlm.LoraConfig(rank=4, alpha=alpha, targets=["q_proj", "v_proj", "o_proj"])
    )
    perturb_trainable(model, seed=seed)
    return graftlm.save_adapter(model, folder)


def test_cli_combines_graftlm_folders_as_peft_does(tiny_model_dir, tmp_path, caplog):
    """`graftlm combine ... --how ties --density 0.5` equals PEFT's add_weighted_adapter on
    graftlm's own folders; the folder loads in PEFT, in graftlm and in `graftlm generate`;
    dare_ties takes the base's module order from the folders' base_model_name_or_path."""
    from transformers import AutoModelForCausalLM

    a = graftlm_adapter(tiny_model_dir, tmp_path / "a", seed=1, alpha=8)
    b = graftlm_adapter(tiny_model_dir, tmp_path / "b", seed=2, alpha=16)
    for how, extra in (("ties", []), ("dare_ties", ["--seed", "5"])):
        out = tmp_path / how
        argv = ["combine", "--adapter", f"a={a}", "--adapter", f"b={b}", "--weights", "0.5,0.5"]
        assert main([*argv, "--how", how, "--density", "0.5", *extra, "--out", str(out)]) == 0
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        model = peft.PeftModel.from_pretrained(base, a, adapter_name="a")
        model.load_adapter(b, adapter_name="b")
        torch.manual_seed(5)
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "c", combination_type=how, density=0.5)
        model.set_adapter("c")
        expected = peft_tensors_of(model, "c")
        found = load_file(out / "adapter_model.safetensors")
        assert sorted(found) == sorted(expected)
        assert all(torch.equal(found[k], expected[k]) for k in expected)
        want = logits(model)
        theirs = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), out
        )
        torch.testing.assert_close(logits(theirs), want, atol=1e-5, rtol=0)
    assert "module name order" not in caplog.text  # o_proj comes after q and v in the model
    ours, _ = graftlm.load_model(tiny_model_dir)
    graftlm.load_adapter(ours, out)
    torch.testing.assert_close(logits(ours), want, atol=1e-5, rtol=0)
    argv = ["generate", "--model", str(tiny_model_dir), "--adapter", str(out), "--prompt", "hi"]
    assert main([*argv, "--max-new-tokens", "3"]) == 0


def peft_tensors_of(model, name):
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


# -- refusals ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory):
    return save_peft_adapters("llama", tmp_path_factory.mktemp("combine-errors"))


def edited(folder, tmp_path, name, config=None, graft=None):
    """A copy of `folder` with fields of adapter_config.json / graftlm.json changed."""
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    for file, changes in (("adapter_config.json", config), ("graftlm.json", graft)):
        if changes is not None:
            path = copy / file
            data = json.loads(path.read_text()) if path.exists() else {}
            data.update(changes)
            path.write_text(json.dumps(data))
    return copy


FINGERPRINT = {"architecture": "LlamaForCausalLM", "shapes_sha256": "1", "weights_sha256": "2"}


@pytest.mark.parametrize(
    "case, kwargs, message",
    [
        ("dora", {}, "DoRA"),
        ("ia3", {}, "LoRA adapters only"),
        ("fingerprint", {}, "different base models"),
        ("regex", {}, "mix a regex string and a list"),
        ("ranks", {}, "needs the same rank"),
        ("weights", {"weights": [1.0]}, "give one weight per adapter"),
        ("how", {"how": "average"}, "how should be one of"),
        ("density0", {"how": "ties", "density": 0.0}, "density should be in (0, 1]"),
        ("density2", {"how": "dare_linear", "density": 1.5}, "density should be in (0, 1]"),
        ("no_density", {"how": "ties_svd"}, "needs a density"),
        ("svd_rank", {"how": "svd", "svd_rank": 100}, "larger than"),
    ],
)
def test_refusals(llama_folders, tmp_path, case, kwargs, message):
    a, b = llama_folders["a"], llama_folders["b"]
    if case == "dora":
        b = edited(b, tmp_path, "dora", config={"use_dora": True})
    elif case == "ia3":
        b = edited(b, tmp_path, "ia3", config={"peft_type": "IA3"})
    elif case == "fingerprint":
        a = edited(a, tmp_path, "fa", graft={"base_fingerprint": FINGERPRINT})
        b = edited(b, tmp_path, "fb", graft={"base_fingerprint": {**FINGERPRINT, "weights_sha256": "3"}})  # fmt: skip
    elif case == "regex":
        b = edited(b, tmp_path, "regex", config={"target_modules": ".*_proj"})
    elif case == "ranks":
        b = llama_folders["c"]
    arguments = {"weights": [0.5, 0.5], "how": "linear", **kwargs}
    with pytest.raises(GraftError, match=re.escape(message)):
        combine_adapters({"a": a, "b": b}, out=tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_cli_refusal_is_one_line(llama_folders, tmp_path, capsys):
    argv = ["combine", "--adapter", f"a={llama_folders['a']}", "--adapter"]
    argv += [f"b={llama_folders['b']}", "--weights", "0.5,x", "--how", "linear", "--out"]
    assert main([*argv, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --weights") and "\n" not in err


def test_other_named_bases_warn(llama_folders, tmp_path, caplog):
    """PEFT folders carry no fingerprint: other base names are a warning, not a refusal."""
    b = edited(llama_folders["b"], tmp_path, "named", config={"base_model_name_or_path": "x"})
    combine_adapters({"a": llama_folders["a"], "b": b}, [1, 1], tmp_path / "out", how="cat")
    assert "different bases" in caplog.text


def test_builtin_model_ties_equals_peft(smollm2_copy, tmp_path):
    """From outside: graftlm's own folders on the built-in model, `--how ties --density 0.5`,
    give PEFT's add_weighted_adapter logits (fp32)."""
    import copy

    model, _ = smollm2_copy
    base = copy.deepcopy(model)
    folders = []
    for seed, alpha in ((1, 8), (2, 16)):
        adapted = copy.deepcopy(base)
        graftlm.inject(
            adapted, graftlm.LoraConfig(rank=4, alpha=alpha, targets=["q_proj", "v_proj"])
        )
        perturb_trainable(adapted, seed=seed)
        folders.append(graftlm.save_adapter(adapted, tmp_path / f"ad{seed}"))
        del adapted
    out = tmp_path / "c"
    argv = ["combine", "--adapter", f"a={folders[0]}", "--adapter", f"b={folders[1]}"]
    argv += ["--weights", "0.5,0.5", "--how", "ties", "--density", "0.5", "--out", str(out)]
    assert main(argv) == 0
    oracle = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="a")
    oracle.load_adapter(folders[1], adapter_name="b")
    oracle.add_weighted_adapter(["a", "b"], [0.5, 0.5], "c", combination_type="ties", density=0.5)
    oracle.set_adapter("c")
    expected = peft_tensors_of(oracle, "c")
    found = load_file(out / "adapter_model.safetensors")
    assert sorted(found) == sorted(expected)
    assert all(torch.equal(found[k], expected[k]) for k in expected)
    want = logits(oracle.eval())
    del oracle
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=0)


def test_serve_mix_is_the_sum_of_its_adapters(llama_folders, tmp_path):
    """`graftlm serve --adapter mix=a:1,b:1`: the mix's folder gives the logits of both
    adapters active at once (PEFT's multi-adapter forward), the others are served as given."""
    from graftlm.cli.combine import expand_mixes

    given = {"a": str(llama_folders["a"]), "b": str(llama_folders["b"]), "mix": "a:1,b:1.0"}
    served = expand_mixes(given)
    assert {k: served[k] for k in ("a", "b")} == {k: given[k] for k in ("a", "b")}
    both = peft.PeftModel.from_pretrained(helpers.tiny_llama(), given["a"], adapter_name="a")
    both.load_adapter(given["b"], adapter_name="b")
    both.base_model.set_adapter(["a", "b"])
    mix = peft.PeftModel.from_pretrained(helpers.tiny_llama(), served["mix"]).eval()
    torch.testing.assert_close(logits(mix), logits(both.eval()), atol=1e-5, rtol=0)
    with pytest.raises(GraftError, match="'c' is not the name of another --adapter"):
        expand_mixes({**given, "mix": "a:0.5,c:0.5"})


def test_rslora_as_peft_writes_it_with_a_warning(tmp_path, caplog):
    """PEFT keeps use_rslora with r = lora_alpha = the new rank, so its combined adapter is
    scaled by sqrt(r); graftlm writes the same numbers, and says so."""
    paths = {}
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        config = peft.LoraConfig(
            r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"], init_lora_weights=False
        )
        peft.get_peft_model(helpers.tiny_llama(), config).save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    model = peft_combined("llama", paths, ["a", "b"], [1.0, 1.0], "cat")
    out = combine_adapters(paths, [1.0, 1.0], tmp_path / "out", how="cat")
    expected, found = peft_tensors(model), load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(found[k], expected[k]) for k in expected)
    assert "scale sqrt(8)" in caplog.text


def test_qlora_adapters_keep_their_4bit_base(llama_folders, tmp_path, caplog):
    a = edited(llama_folders["a"], tmp_path, "qa", graft={"quantize": "nf4"})
    b = edited(llama_folders["b"], tmp_path, "qb", graft={"quantize": "nf4"})
    out = combine_adapters([a, b], [0.5, 0.5], tmp_path / "out", how="cat")
    assert json.loads((out / "graftlm.json").read_text())["quantize"] == "nf4"
    out = combine_adapters([a, llama_folders["b"]], [0.5, 0.5], tmp_path / "mixed", how="cat")
    assert json.loads((out / "graftlm.json").read_text())["quantize"] is None
    assert "other precisions" in caplog.text
