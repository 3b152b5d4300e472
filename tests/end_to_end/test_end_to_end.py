"""End to end on the built-in model, through the CLI a user runs:
train a few steps → adapter → generate → merge → plain transformers gives the same greedy text,
and the adapter loads in PEFT with the same greedy text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from graftlm.cli.parser import main as cli_main

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "tickets"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm2):
    """A LoRA adapter trained briefly (but enough to change greedy answers) by `graftlm train`."""
    out = tmp_path_factory.mktemp("e2e") / "adapter"
    data = tmp_path_factory.getbasetemp() / "train64.jsonl"
    data.write_text("".join((DATA / "train.jsonl").read_text().splitlines(keepends=True)[:64]))
    code = cli_main(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "8",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--quiet",
            "--no-forgetting",
        ]
    )
    assert code == 0
    return out


def _prompts(n: int = 4) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()[:n]]
    return [{"messages": row["messages"][:-1]} for row in rows]


def _generate_file(tmp_path: Path, adapter, rows: list[dict], *flags: str) -> list[dict]:
    """`graftlm generate --input` on `rows` (written to a file); the rows it writes back."""
    inputs, preds = tmp_path / "in.jsonl", tmp_path / "preds.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    command = [
        "generate",
        "--adapter",
        str(adapter),
        "--input",
        str(inputs),
        "--output",
        str(preds),
    ]
    assert cli_main([*command, *flags]) == 0
    return [json.loads(line) for line in preds.read_text().splitlines()]


def test_outputs_of_a_training_run(trained):
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png"):
        assert (trained / name).is_file()
    config = json.loads((trained / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["base_model_name_or_path"] == "smollm2-135m-instruct"
    )


def test_generate_merge_and_plain_transformers_agree(trained, tmp_path, smollm2):
    from transformers import AutoModelForCausalLM

    from graftlm.data.dataset import prompt_for_generation

    rows = _generate_file(tmp_path, trained, _prompts(), "--max-new-tokens", "12")
    assert len(rows) == 4 and all("output" in r and "messages" in r for r in rows)

    merged_dir = tmp_path / "merged"
    assert cli_main(["merge", "--adapter", str(trained), "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True).eval()
    _, tokenizer = smollm2
    base_model, _ = smollm2
    differs_from_base = 0
    for row in rows:
        prompt = prompt_for_generation(row, tokenizer)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = merged.generate(
                **ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2
            )
            base = base_model.generate(
                **ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2
            )
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text == row["output"]
        differs_from_base += text != tokenizer.decode(
            base[0, ids["input_ids"].shape[1] :], skip_special_tokens=True
        )
    assert differs_from_base > 0, "8 steps at lr 1e-3 should change some greedy answers"


def test_peft_loads_the_trained_adapter_with_the_same_greedy_text(trained, smollm2_copy, tmp_path):
    from peft import PeftModel

    from graftlm.data.dataset import prompt_for_generation

    model, tokenizer = smollm2_copy
    rows = _generate_file(
        tmp_path, trained, _prompts(2), "--max-new-tokens", "12", "--batch-size", "1"
    )
    peft_model = PeftModel.from_pretrained(model, str(trained)).eval()
    for row in rows:
        ids = tokenizer(
            prompt_for_generation(row, tokenizer), add_special_tokens=False, return_tensors="pt"
        )
        with torch.no_grad():
            out = peft_model.generate(
                **ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2
            )
        assert (
            tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            == row["output"]
        )


def test_peft_trained_rslora_adapter_generates_the_same_text_in_graftlm(smollm2_copy, tmp_path):
    """A PEFT adapter (rsLoRA, rank 16, all linear layers), through `graftlm generate`'s batched,
    left-padded path, gives PEFT's own one-prompt-at-a-time greedy text."""
    from peft import LoraConfig, get_peft_model

    from graftlm.data.dataset import prompt_for_generation

    model, tokenizer = smollm2_copy
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=16,
            use_rslora=True,
            target_modules="all-linear",
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():  # a visible but sane update, like a trained adapter
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.02)
    peft_model.eval()
    folder = tmp_path / "peft_adapter"
    peft_model.save_pretrained(folder)
    rows = _prompts(6)
    written = _generate_file(
        tmp_path, folder, rows, "--model", "smollm2-135m-instruct", "--max-new-tokens", "16"
    )
    outputs = [r["output"] for r in written]
    for row, output in zip(rows, outputs):
        ids = tokenizer(
            prompt_for_generation(row, tokenizer), add_special_tokens=False, return_tensors="pt"
        )
        with torch.no_grad():
            out = peft_model.generate(
                **ids, max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=2
            )
        assert (
            tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            == output
        )
