"""The adapter registry: many registered, a budget's worth loaded, LRU eviction, pins, threads."""

from __future__ import annotations

import random
import shutil
import threading

import helpers
import pytest
import torch
from visible_models import one_thread  # noqa: F401  (autouse fixture)

import graftlm
from graftlm.errors import GraftError
from graftlm.methods.lora.config import LoraConfig
from graftlm.methods.lora.inject import adapter_names
from graftlm.serve.adapter_pool import AdapterBusy, AdapterRegistry, UnknownAdapter


def save(folder, config=None, seed=0, base_seed=0):
    model = helpers.tiny_llama(seed=base_seed)
    graftlm.inject(model, config or LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return graftlm.save_adapter(model, folder)


@pytest.fixture
def folders(tmp_path):
    return [save(tmp_path / f"a{i}", seed=i) for i in range(4)]


def test_registers_many_without_loading_them(tmp_path, folders):
    registry = AdapterRegistry(helpers.tiny_llama())
    for i in range(120):
        copy = tmp_path / "many" / f"ad{i}"
        shutil.copytree(folders[i % 4], copy)
        registry.register(f"org/adapter.v{i}", copy)  # any printable name
    assert len(registry.names()) == 120
    assert registry.loaded() == [] and registry.loaded_bytes() == 0
    entry = registry.entry("org/adapter.v7")
    # 2 layers x (q, v) x (A [4, 64] + B [out, 4]) in fp32
    assert entry.nbytes == 4 * 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    with registry.using(["org/adapter.v7"]) as (internal,):
        assert internal in adapter_names(registry.model)
    assert registry.loaded() == ["org/adapter.v7"]


def test_least_recently_used_adapter_is_unloaded_first(folders):
    registry = AdapterRegistry(helpers.tiny_llama())
    for i, folder in enumerate(folders):
        registry.register(f"a{i}", folder)
    registry.budget_bytes = 2 * registry.entry("a0").nbytes
    for name in ("a0", "a1", "a0", "a2"):  # a1 is the least recently used when a2 arrives
        registry.release(registry.acquire([name]))
    assert registry.loaded() == ["a0", "a2"]
    assert registry.loaded_bytes() <= registry.budget_bytes
    assert len(adapter_names(registry.model)) == 2  # the evicted one left the model
    registry.release(registry.acquire(["a1"]))  # re-loaded on demand
    assert registry.loaded() == ["a2", "a1"]


def test_reloaded_adapter_computes_what_it_did(folders):
    model = helpers.tiny_llama()
    registry = AdapterRegistry(model)
    registry.register("a0", folders[0])
    registry.register("a1", folders[1])
    ids = torch.tensor([[5, 6, 7, 8]])

    def run(name):
        with registry.using([name]) as (internal,), graftlm.row_adapters(model, [internal]):
            with torch.inference_mode():
                return model(input_ids=ids).logits

    first = run("a0")
    registry.budget_bytes = registry.entry("a0").nbytes  # room for one: a0 and a1 alternate
    run("a1")
    assert registry.loaded() == ["a1"]
    assert torch.equal(run("a0"), first)


def test_loaded_adapters_serve_in_eval_mode(tmp_path):
    folder = save(tmp_path / "drop", LoraConfig(rank=4, targets=("q_proj",), dropout=0.5))
    model = helpers.tiny_llama().train()
    registry = AdapterRegistry(model)
    registry.register("drop", folder, load=True)
    assert not any(m.training for m in model.modules())  # no random LoRA dropout in answers


def test_pinned_adapters_are_never_evicted(folders):
    registry = AdapterRegistry(helpers.tiny_llama())
    registry.register("a0", folders[0])
    registry.register("a1", folders[1])
    registry.budget_bytes = registry.entry("a0").nbytes
    held = registry.acquire(["a0"])
    with pytest.raises(AdapterBusy):
        registry.acquire(["a1"])
    assert registry.loaded() == ["a0"]
    registry.release(held)
    registry.release(registry.acquire(["a1"]))
    assert registry.loaded() == ["a1"]
    with pytest.raises(GraftError, match="more than the whole adapter memory budget"):
        registry.budget_bytes = 10
        registry.acquire(["a0"])


def test_unregister_while_in_use_unloads_at_the_last_release(folders):
    registry = AdapterRegistry(helpers.tiny_llama())
    registry.register("a0", folders[0], load=True)
    held = registry.acquire(["a0"])
    registry.unregister("a0")
    assert "a0" not in registry and len(adapter_names(registry.model)) == 1
    with pytest.raises(UnknownAdapter):
        registry.acquire(["a0"])
    registry.release(held)
    assert adapter_names(registry.model) == [] and registry.loaded_bytes() == 0
    with pytest.raises(UnknownAdapter):
        registry.unregister("a0")


def test_register_checks_the_base_and_what_can_be_served(tmp_path, folders):
    registry = AdapterRegistry(helpers.tiny_llama())
    other_base = save(tmp_path / "other", base_seed=1)
    with pytest.raises(GraftError, match="different base model"):
        registry.register("other", other_base)
    AdapterRegistry(helpers.tiny_llama(), force=True).register("other", other_base, load=True)
    biased = save(tmp_path / "bias", LoraConfig(rank=2, targets=("q_proj",), bias="all"))
    with pytest.raises(GraftError, match="train biases"):
        registry.register("bias", biased)
    with pytest.raises(GraftError, match="does not exist"):
        registry.register("nothing", tmp_path / "nothing")
    registry.register("a0", folders[0])
    with pytest.raises(GraftError, match="already registered"):
        registry.register("a0", folders[1])
    registry.register("a0", folders[1], replace=True)
    assert registry.entry("a0").path == folders[1]
    (folders[2] / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(GraftError, match="truncated or corrupt"):
        registry.register("broken", folders[2])
    assert registry.names() == ["a0"]


def test_threads_share_a_tight_budget(folders):
    registry = AdapterRegistry(helpers.tiny_llama())
    for i, folder in enumerate(folders):
        registry.register(f"a{i}", folder)
    registry.budget_bytes = 2 * registry.entry("a0").nbytes
    errors, over_budget = [], []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(30):
            try:
                entries = registry.acquire([f"a{rng.randrange(4)}"])
            except AdapterBusy:
                continue
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return
            if registry.loaded_bytes() > registry.budget_bytes:
                over_budget.append(registry.loaded())
            registry.release(entries)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not over_budget
    assert all(registry.entry(n).pins == 0 for n in registry.names())
    assert len(adapter_names(registry.model)) == len(registry.loaded()) <= 2
