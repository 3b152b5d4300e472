"""Prompt tuning and prefix tuning: PEFT 0.21 as the oracle, generation, training, errors.

PEFT computes both methods by putting the virtual tokens into the input (prompt tuning) or the
KV cache (prefix tuning); graftlm adds them inside attention. Teacher-forced logits must agree
both ways (folders graftlm writes load in `PeftModel.from_pretrained`, PEFT's load in graftlm).
PEFT's own generation for these methods is broken under transformers 5 (garbage after the
first token), so generation is checked against a greedy loop over PEFT's forward instead.
Tiny random models (GQA: 4 query / 2 key-value heads), fp32, eval mode.
"""

from __future__ import annotations

import copy
import json

import helpers
import pytest
import torch
from safetensors.torch import load_file
from visible_models import one_thread, perturb_trainable, tiny_llama, tiny_qwen2  # noqa: F401

from graftlm.adapters.switch import delete_adapter, disable_adapters, row_adapters, set_adapter
from graftlm.errors import GraftError
from graftlm.methods.virtual_tokens import prefix as prefix_tuning
from graftlm.methods.virtual_tokens import prompt as prompt_tuning

peft = pytest.importorskip("peft")

ATOL = 1e-5
P = 5
BUILD = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def ids(rows: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, helpers.TINY_VOCAB, (rows, length), generator=generator)


def logits(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=input_ids, **kwargs).logits.float()


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def with_prompt(kind="llama", init="random", **kwargs):
    model = BUILD[kind]()
    torch.manual_seed(0)  # the random init draws from the global generator
    prompt_tuning.add_prompt(model, P, init, **kwargs)
    perturb_trainable(model)  # simulate training: visible, seeded changes
    return model.eval()


def with_prefix(kind="llama", **kwargs):
    model = BUILD[kind]()
    torch.manual_seed(0)
    prefix_tuning.add_prefix(model, P, "random", **kwargs)
    perturb_trainable(model)
    return model.eval()


def peft_logits(folder, kind, input_ids, attention_mask=None):
    """PEFT's teacher-forced logits for the real tokens (prompt tuning returns P extra rows)."""
    model = peft.PeftModel.from_pretrained(BUILD[kind](), str(folder)).eval()
    out = logits(model, input_ids, attention_mask=attention_mask)
    return out[:, -input_ids.shape[1] :]


# -- PEFT oracle, graftlm -> PEFT -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["prompt", "prefix", "prefix_projection"])
def test_graftlm_folder_loads_in_peft_with_the_same_logits(tmp_path, kind, method):
    if method == "prompt":
        model, module = with_prompt(kind), prompt_tuning
    else:
        model = with_prefix(kind, projection=method == "prefix_projection", encoder_hidden_size=24)
        module = prefix_tuning
    module.save(model, tmp_path, None)
    x = ids()
    mask = torch.ones_like(x)
    mask[1, -3:] = 0  # right padding, as in training and teacher-forced evaluation
    ours = logits(model, x, attention_mask=mask)
    theirs = peft_logits(tmp_path, kind, x, mask)
    keep = mask.bool()
    close(ours[keep], theirs[keep])
    base = logits(BUILD[kind](), x, attention_mask=mask)
    assert (ours - base)[keep].abs().max() > 0.1  # the adapter does something


def test_saved_files_have_peft_layout(tmp_path):
    prompt_dir, prefix_dir = tmp_path / "prompt", tmp_path / "prefix"
    prompt_tuning.save(with_prompt(), prompt_dir, "some/base")
    prefix_tuning.save(with_prefix(projection=True), prefix_dir, "some/base")
    prompt = json.loads((prompt_dir / "adapter_config.json").read_text())
    prefix = json.loads((prefix_dir / "adapter_config.json").read_text())
    assert prompt["peft_type"] == "PROMPT_TUNING" and prompt["task_type"] == "CAUSAL_LM"
    assert (prompt["num_virtual_tokens"], prompt["token_dim"], prompt["num_layers"]) == (P, 64, 2)
    assert prompt["base_model_name_or_path"] == "some/base"
    # GQA: PEFT's prefix uses the key/value heads (2 of the 4), token_dim = 2 * head_dim 16
    assert (prefix["num_attention_heads"], prefix["token_dim"], prefix["num_layers"]) == (2, 32, 2)
    assert prefix["prefix_projection"] is True
    assert load_file(prompt_dir / "adapter_model.safetensors")["prompt_embeddings"].shape == (P, 64)
    # folded: the MLP's output, [P, layers * 2 * token_dim]
    folded = load_file(prefix_dir / "adapter_model.safetensors")
    assert list(folded) == ["prompt_embeddings"] and folded["prompt_embeddings"].shape == (P, 128)


def test_prefix_projection_folds_to_the_same_logits(tmp_path):
    model = with_prefix(projection=True)
    x = ids()
    trained = logits(model, x)
    prefix_tuning.save(model, tmp_path, None)
    loaded = tiny_llama()
    prefix_tuning.load(loaded, tmp_path)
    close(logits(loaded, x), trained)
    assert not any(
        "transform" in n for n, _ in loaded.named_parameters()
    )  # the MLP is gone after the fold


# -- PEFT oracle, PEFT -> graftlm -------------------------------------------------------------


def peft_trained(kind, config, seed=0):
    model = peft.get_peft_model(BUILD[kind](), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.prompt_encoder.named_parameters()):
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["prompt", "prefix", "prefix_projection"])
def test_peft_folder_loads_in_graftlm_with_the_same_logits(tmp_path, kind, method):
    if method == "prompt":
        config = peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, prompt_tuning_init="SAMPLE_VOCAB"
        )
        module = prompt_tuning
    else:
        config = peft.PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=P,
            prefix_projection=method == "prefix_projection",
            encoder_hidden_size=24,
        )
        module = prefix_tuning
    trained = peft_trained(kind, config)
    x = ids()
    theirs = logits(trained, x)[:, -x.shape[1] :]  # PEFT's training forward: the reference
    trained.save_pretrained(tmp_path)
    model = BUILD[kind]()
    module.load(model, tmp_path)
    close(logits(model, x), theirs)


# -- inits --------------------------------------------------------------------------------


def test_prompt_init_from_text_uses_its_token_embeddings(tmp_path):
    tokenizer = helpers.tiny_tokenizer()
    model = tiny_llama()
    table = model.get_input_embeddings().weight.detach().clone()
    prompt_tuning.add_prompt(model, 7, "Hey", tokenizer)
    token_ids = tokenizer("Hey")["input_ids"]  # 3 bytes, repeated to 7 as PEFT does
    expected = table[(token_ids * 3)[:7]]
    close(model.prompt_encoder.default.embedding.weight.detach(), expected, atol=0)
    prompt_tuning.save(model, tmp_path, "tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["prompt_tuning_init"] == "TEXT"
    assert config["prompt_tuning_init_text"] == "Hey"
    assert config["tokenizer_name_or_path"] == "tiny"
    peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # PEFT accepts the config


def test_prompt_init_vocab_and_random_scales():
    model = tiny_llama()
    table = model.get_input_embeddings().weight.detach()
    prompt_tuning.add_prompt(model, 6, "vocab")
    vectors = model.prompt_encoder.default.embedding.weight.detach()
    # each vector is a row of the vocabulary table
    assert all((table == v).all(dim=1).any() for v in vectors)
    other = tiny_llama()
    prompt_tuning.add_prompt(other, 200, "random")
    std = other.prompt_encoder.default.embedding.weight.std().item()
    assert std == pytest.approx(table.std().item(), rel=0.2)


def test_prefix_init_from_vocab_is_the_base_models_keys_and_values():
    model = tiny_llama()
    torch.manual_seed(3)
    prefix_tuning.add_prefix(model, 4, "vocab")
    torch.manual_seed(3)
    chosen = torch.randint(0, helpers.TINY_VOCAB, (4,))
    # layer 0's keys/values of those tokens, at position 0: k_proj / v_proj of the normed embedding
    base = tiny_llama()
    hidden = base.model.layers[0].input_layernorm(base.model.embed_tokens(chosen))
    keys = base.model.layers[0].self_attn.k_proj(hidden)
    values = base.model.layers[0].self_attn.v_proj(hidden)
    flat = model.prompt_encoder.default.embedding.weight.detach()
    close(flat[:, :32], keys.detach())
    close(flat[:, 32:64], values.detach())


# -- generation ---------------------------------------------------------------------------


PROMPTS = ["a", "hello there", "the quick brown fox jumps", "xy"]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_batched_generation_with_mixed_lengths_equals_one_at_a_time(method):
    from graftlm.infer.generate import SamplingConfig, generate

    model = with_prompt() if method == "prompt" else with_prefix()
    tokenizer = helpers.tiny_tokenizer()
    sampling = SamplingConfig(max_new_tokens=8)
    batched = generate(model, tokenizer, PROMPTS, sampling=sampling, batch_size=4)
    alone = [generate(model, tokenizer, [p], sampling=sampling)[0] for p in PROMPTS]
    assert batched == alone
    with disable_adapters(model):
        base = generate(model, tokenizer, PROMPTS, sampling=sampling, batch_size=4)
    assert base != batched


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_cached_generation_follows_peft_forward(tmp_path, method):
    """Greedy `generate` (KV cache, one token at a time) picks what PEFT's full forward picks."""
    model = with_prompt() if method == "prompt" else with_prefix()
    (prompt_tuning if method == "prompt" else prefix_tuning).save(model, tmp_path, None)
    reference = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    x = ids(rows=1, length=6, seed=4)
    with torch.inference_mode():
        ours = model.generate(
            x, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
        )[0, 6:]
    sequence = x
    for _ in range(6):  # PEFT's training forward over the whole sequence, every step
        step = logits(reference, sequence)[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, step], dim=1)
    assert ours.tolist() == sequence[0, 6:].tolist()


# -- training -----------------------------------------------------------------------------


def shared_prefix_batch():
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(4, 200, (12,), generator=generator)
    rows = [torch.cat([prefix, torch.randint(4, 200, (9,), generator=generator)]) for _ in range(3)]
    input_ids = torch.stack(rows)
    mask = torch.ones_like(input_ids)
    mask[2, -3:] = 0
    labels = input_ids.clone()
    labels[:, :10] = -100
    labels[mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("method", ["prompt", "prefix", "prefix_projection"])
def test_shared_prefix_forward_is_exact(method):
    from graftlm.data.dataset import Example
    from graftlm.train.forward import loss_sum, prefix_sharing_is_exact

    if method == "prompt":
        model = with_prompt()
    else:
        model = with_prefix(projection=method == "prefix_projection", encoder_hidden_size=24)
    batch = shared_prefix_batch()
    results = []
    for share in (False, True):
        model.zero_grad()
        loss, count = loss_sum(model, batch, torch.float32, share_prefix=share)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), count, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert results[0][1] == results[1][1]
    assert set(results[0][2]) == {
        n for n, _ in model.prompt_encoder.named_parameters(prefix="prompt_encoder")
    }
    for name, grad in results[0][2].items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, results[1][2][name], rtol=1e-4, atol=1e-5)
    row = batch["input_ids"][0].tolist()
    assert prefix_sharing_is_exact(model, Example(row, row, "x"), 2)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(method):
    """`--low-memory` re-runs layers in backward: each must see its prefix again."""
    from graftlm.train.forward import loss_sum

    results = []
    for checkpointing in (False, True):
        model = with_prompt() if method == "prompt" else with_prefix()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
        loss, _ = loss_sum(model, shared_prefix_batch(), torch.float32, share_prefix=False)
        loss.backward()
        results.append((loss.detach(), model.prompt_encoder.default.embedding.weight.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


def write_chat(path, rows: int):
    import random

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            label = rng.choice(["red", "green", "blue"])
            messages = [
                {"role": "user", "content": f"item {i} is {label}"},
                {"role": "assistant", "content": label},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_train_cli_path_trains_only_the_virtual_parameters(tmp_path, tiny_model_dir, method):
    from graftlm.adapters.io import load_any
    from graftlm.models.load import load_model
    from graftlm.train.config import TrainConfig
    from graftlm.train.loop import train

    def run(steps: int):
        cfg = TrainConfig(
            data=str(write_chat(tmp_path / "train.jsonl", 40)),
            out=str(tmp_path / f"out{steps}"),
            model=str(tiny_model_dir),
            method=method,
            num_virtual_tokens=4,
            batch_size=8,
            steps=steps,
            dtype="float32",
        )
        return train(cfg, progress=False)

    result = run(6)
    assert result.trainable_parameters == 4 * (64 if method == "prompt" else 2 * 2 * 32)
    assert json.loads((result.out / "graftlm.json").read_text())["method"] == method
    weights = load_file(result.out / "adapter_model.safetensors")["prompt_embeddings"]
    early = load_file(run(1).out / "adapter_model.safetensors")["prompt_embeddings"]
    assert (weights - early).abs().max() > 1e-3  # the prompt/prefix did train

    model, _ = load_model(str(tiny_model_dir), dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert load_any(model, result.out) == method
    torch.testing.assert_close(model.prompt_encoder.default.embedding.weight.detach(), weights)
    for name, param in model.named_parameters():
        if not name.startswith("prompt_encoder."):
            assert torch.equal(param, before[name]), name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]  # as LoRA's load does


def test_only_the_active_prompt_trains_and_base_stays_frozen():
    model = tiny_llama()
    summary = prompt_tuning.add_prompt(model, P, "random")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]
    assert summary.trainable == P * 64
    model.train()
    loss = model(input_ids=ids()).logits.float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


# -- state, switching, copies -------------------------------------------------------------


def test_disable_copy_and_cache_invalidation():
    model = with_prefix()
    x = ids()
    adapted, base = logits(model, x), logits(tiny_llama(), x)
    with disable_adapters(model):
        close(logits(model, x), base)
    close(logits(model, x), adapted)
    twin = copy.deepcopy(model)
    close(logits(twin, x), adapted)
    other = copy.deepcopy(model)
    delete_adapter(other, "default")  # the copy's last adapter out: the copy is the base
    close(logits(other, x), base)
    close(logits(model, x), adapted)  # and the original keeps its hooks
    with torch.no_grad():  # an in-place update (as optimizer.step does) invalidates the cache
        twin.prompt_encoder.default.embedding.weight.mul_(2)
    assert (logits(twin, x) - adapted).abs().max() > 0.1
    close(logits(model, x), adapted)  # the original is untouched
    set_adapter(model, [])
    close(logits(model, x), base)


def test_prompt_cache_follows_parameter_updates():
    model = with_prompt()
    x = ids()
    first = logits(model, x)
    close(logits(model, x), first)
    with torch.no_grad():
        model.prompt_encoder.default.embedding.weight.add_(0.5)
    assert (logits(model, x) - first).abs().max() > 0.1


# -- several adapters, one per row (serving) ------------------------------------------------


def two_adapters(tmp_path):
    """A prompt adapter with P=5 and a prefix adapter with P=3, saved; their folders."""
    prompt_tuning.save(with_prompt(), tmp_path / "a", None)
    model = tiny_llama()
    prefix_tuning.add_prefix(model, 3, "random")
    perturb_trainable(model, seed=1)
    prefix_tuning.save(model, tmp_path / "b", None)
    return {"a": tmp_path / "a", "b": tmp_path / "b"}


def only(folders, name):
    from graftlm.adapters.io import load_any

    model = tiny_llama()
    if name is not None:
        load_any(model, folders[name], name)
    return model


def test_rows_with_different_adapters_compute_what_each_computes_alone(tmp_path):
    from graftlm.adapters.io import load_any
    from graftlm.infer.generate import SamplingConfig, generate

    folders = two_adapters(tmp_path)
    model = tiny_llama()
    for name, folder in folders.items():
        load_any(model, folder, name)
    names = ["a", "b", None]
    x = ids(rows=3)
    with row_adapters(model, names):
        mixed = logits(model, x)
    for row, name in enumerate(names):
        close(mixed[row], logits(only(folders, name), x[row : row + 1])[0])
    tokenizer = helpers.tiny_tokenizer()
    sampling = SamplingConfig(max_new_tokens=6)
    row_names = ["a", "b", None, "a"]
    batched = generate(model, tokenizer, PROMPTS, adapters=row_names, sampling=sampling)
    for prompt, name, text in zip(PROMPTS, row_names, batched):
        assert generate(only(folders, name), tokenizer, [prompt], sampling=sampling) == [text]


def test_unloading_the_last_adapter_restores_the_base(tmp_path):
    from graftlm.adapters.io import load_any

    folders = two_adapters(tmp_path)
    model = tiny_llama()
    implementation = model.config._attn_implementation
    for name, folder in folders.items():
        load_any(model, folder, name)
    x = ids()
    delete_adapter(model, "b")
    close(logits(model, x), logits(only(folders, "a"), x))  # "a" stays active
    delete_adapter(model, "a")
    close(logits(model, x), logits(tiny_llama(), x))
    assert model.config._attn_implementation == implementation
    assert not hasattr(model, "prompt_encoder") and not hasattr(model, "graftlm_virtual_tokens")
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks


def test_serving_engine_batches_prompt_prefix_and_base_rows_as_each_alone(tmp_path):
    """The engine's own cache, positions and row groups: answers equal solo generation."""
    import threading

    from graftlm.infer.generate import SamplingConfig, generate
    from graftlm.serve.adapter_pool import AdapterRegistry
    from graftlm.serve.scheduler import Engine, Request

    folders = two_adapters(tmp_path)
    tokenizer = helpers.tiny_tokenizer()
    model = tiny_llama()
    registry = AdapterRegistry(model)
    for name, folder in folders.items():
        registry.register(name, folder)
    engine = Engine(model, tokenizer, registry, max_batch=4)
    sampling = SamplingConfig(max_new_tokens=6)
    row_names = ["a", "b", None, "a", "b", None]
    prompts = PROMPTS + ["ok", "tell me more"]
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
        assert [answers[row]] == generate(
            only(folders, name), tokenizer, [prompt], sampling=sampling
        )


# -- errors -------------------------------------------------------------------------------


def test_merge_is_refused_with_a_clear_error():
    for module in (prompt_tuning, prefix_tuning):
        assert module.MERGEABLE is False
        with pytest.raises(GraftError, match="cannot be merged"):
            module.merge(tiny_llama())


def test_unsupported_model_and_bad_settings_are_refused():
    with pytest.raises(GraftError, match="GPT-2"):
        prompt_tuning.add_prompt(helpers.tiny_gpt2(), P)
    with pytest.raises(GraftError, match="num_virtual_tokens"):
        prefix_tuning.add_prefix(tiny_llama(), 0)
    with pytest.raises(GraftError, match="needs the model's tokenizer"):
        prompt_tuning.add_prompt(tiny_llama(), P, "Classify the ticket")


def variant(**changes):
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    for key, value in changes.items():
        setattr(config, key, value)
    return LlamaForCausalLM(config).eval()


def test_loading_into_another_model_names_the_file_and_shapes(tmp_path):
    prefix_tuning.save(with_prefix(), tmp_path / "prefix", None)
    prompt_tuning.save(with_prompt(), tmp_path / "prompt", None)
    deeper = variant(num_hidden_layers=3)
    with pytest.raises(GraftError, match=r"adapter_config.json: num_layers 2 \(this model: 3\)"):
        prefix_tuning.load(deeper, tmp_path / "prefix")
    wider = variant(hidden_size=32, intermediate_size=64)
    with pytest.raises(GraftError, match="token_dim 64 does not match this model's hidden size 32"):
        prompt_tuning.load(wider, tmp_path / "prompt")
    with pytest.raises(GraftError, match="peft_type is 'PROMPT_TUNING', expected 'PREFIX_TUNING'"):
        prefix_tuning.load(tiny_llama(), tmp_path / "prompt")
    # a tensor that does not match its config
    config = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    config["num_virtual_tokens"] = P + 1
    (tmp_path / "prompt" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        GraftError, match=r"'prompt_embeddings' has shape \[5, 64\], this model needs \[6, 64\]"
    ):
        prompt_tuning.load(tiny_llama(), tmp_path / "prompt")
    (tmp_path / "prefix" / "adapter_model.safetensors").unlink()
    with pytest.raises(GraftError, match="adapter_model.safetensors: not found"):
        prefix_tuning.load(tiny_llama(), tmp_path / "prefix")


# -- the built-in model (slow) ------------------------------------------------------------


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_eval_loss_equals_peft_forward_loss_on_smollm2(tmp_path, smollm2, smollm2_copy, method):
    """`graftlm eval`'s teacher-forced answer loss is PEFT's training-forward loss."""
    from graftlm.data.dataset import load_dataset
    from graftlm.infer.evaluate import evaluate_file, final_answer_only

    model, tokenizer = smollm2_copy
    torch.manual_seed(0)
    if method == "prompt":
        prompt_tuning.add_prompt(model, 8, "Route the ticket", tokenizer)
        prompt_tuning.save(model, tmp_path / "adapter", "smollm2-135m-instruct")
    else:
        prefix_tuning.add_prefix(model, 8, "vocab")
        prefix_tuning.save(model, tmp_path / "adapter", "smollm2-135m-instruct")
    rows = tmp_path / "rows.jsonl"
    lines = open("examples/data/tickets/test.jsonl", encoding="utf-8").readlines()[:6]
    rows.write_text("".join(lines), encoding="utf-8")
    ours = evaluate_file(model.eval(), tokenizer, str(rows))["loss"]

    reference = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2[0]), str(tmp_path / "adapter"))
    total = count = 0.0
    examples, _ = load_dataset(str(rows), tokenizer, 2048)
    with torch.inference_mode():
        for example in map(final_answer_only, examples):
            labels = torch.tensor([example.labels])
            out = reference.eval()(input_ids=torch.tensor([example.input_ids]), labels=labels)
            tokens = int((labels[:, 1:] != -100).sum())
            total += out.loss.item() * tokens
            count += tokens
    assert ours == pytest.approx(total / count, rel=1e-4)
    with disable_adapters(model):  # and the adapter matters
        base = evaluate_file(model, tokenizer, str(rows))["loss"]
    assert abs(base - ours) > 0.05


def test_inspect_describes_prompt_and_prefix_folders(tmp_path):
    from graftlm.adapters.inspect import describe
    from graftlm.adapters.io import save_trained

    model = with_prompt()
    save_trained(model, tmp_path / "prompt", "prompt")
    facts = describe(tmp_path / "prompt")
    assert facts["method"] == "prompt" and facts["num_virtual_tokens"] == P
    assert facts["trainable_parameters"] == P * 64
    assert facts["method_facts"]["virtual tokens"] == P
    save_trained(with_prefix(projection=True), tmp_path / "prefix", "prefix")
    facts = describe(tmp_path / "prefix")
    assert facts["method"] == "prefix" and facts["prefix_projection"] is True
    assert facts["trainable_parameters"] == P * 2 * 2 * 32  # the folded prefix
