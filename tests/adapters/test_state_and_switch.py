"""One AdapterState per model and one dispatch path: LoRA and (IA)³ side by side on one base,
switched, disabled and deleted through `adapters.switch`, and every method's contract."""

from __future__ import annotations

import pytest
import torch
from visible_models import one_thread, perturb_trainable, tiny_llama  # noqa: F401

import graftlm
from graftlm.adapters.state import ATTRIBUTE, adapter_state
from graftlm.errors import GraftError
from graftlm.methods import REGISTRY, method_module
from graftlm.methods.ia3 import method as ia3

CONTRACT = ("NAME", "PEFT_TYPE", "MERGEABLE", "ROW_ADAPTERS", "DEFAULTS", "attach", "save")
CONTRACT += ("read_config", "load", "set_active", "disabled", "unload", "merge")
MERGING = ("unmerge", "merge_and_unload")


def logits(model, rows: int = 1) -> torch.Tensor:
    ids = torch.arange(4, 12)[None].expand(rows, -1)
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def close(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_implements_the_contract(method):
    module = method_module(method)
    names = CONTRACT + (MERGING if module.MERGEABLE else ())
    assert [n for n in names if not hasattr(module, n)] == []


def with_lora(model):
    torch.manual_seed(0)  # A starts kaiming-uniform from the global generator
    graftlm.inject(model, graftlm.LoraConfig(rank=2, targets=["q_proj", "v_proj"]), "lo")
    perturb_trainable(model, seed=1)


def with_ia3(model):
    ia3.add_ia3(model, ia3.default_spec(model, "k_proj,down_proj"), "ia")
    perturb_trainable(model, seed=2)


def lora_and_ia3():
    """A base with LoRA "lo" (q/v) and then (IA)³ "ia" (k/down), each perturbed; the logits
    of each alone and of the base."""
    alone = {None: logits(tiny_llama())}
    for name, add in (("lo", with_lora), ("ia", with_ia3)):
        model = tiny_llama()
        add(model)
        alone[name] = logits(model)
    model = tiny_llama()
    with_lora(model)
    with_ia3(model)
    return model, alone


def test_one_record_on_the_model_for_every_method():
    model, _ = lora_and_ia3()
    assert [k for k in vars(model) if k.startswith("graftlm")] == [ATTRIBUTE]
    state = adapter_state(model)
    assert {n: a.method for n, a in state.adapters.items()} == {"lo": "lora", "ia": "ia3"}
    assert graftlm.adapter_names(model) == ["lo", "ia"]
    assert graftlm.active_adapters(model) == ["ia"]  # added last: the active one
    assert state.fingerprint is not None


def test_switching_disabling_and_deleting_across_methods():
    model, alone = lora_and_ia3()
    close(logits(model), alone["ia"])
    graftlm.set_adapter(model, "lo")
    close(logits(model), alone["lo"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with graftlm.disable_adapters(model):
        close(logits(model), alone[None])
    with graftlm.row_adapters(model, ["ia", "lo", None]):
        mixed = logits(model, rows=3)
    for row, name in enumerate(["ia", "lo", None]):
        close(mixed[row], alone[name][0])
    with pytest.raises(GraftError, match="already exists"):
        graftlm.inject(model, graftlm.LoraConfig(rank=2, targets=["q_proj"]), "ia")
    graftlm.delete_adapter(model, "lo")
    graftlm.delete_adapter(model, "ia")
    assert graftlm.adapter_names(model) == [] and graftlm.active_adapters(model) == []
    close(logits(model), alone[None])
