"""Which base an adapter's `base_model_name_or_path` names: a folder holding one GGUF file, the
hub id of the built-in model, or something this machine does not hold (an error naming --model)."""

from __future__ import annotations

import json

import pytest

from graftlm.cli.parser import main as cli_main
from graftlm.errors import GraftError
from graftlm.infer.generate import base_for_adapters
from graftlm.models.load import (
    BUILTIN_NAME,
    builtin_gguf_path,
    gguf_in_folder,
    is_local_model,
    load_model,
    load_tokenizer,
)


def _adapter_naming(folder, base):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    config["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_folder_with_one_gguf_names_it(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "README.md").write_text("not a model")
    assert gguf_in_folder(tmp_path) == tmp_path / "model.gguf"


def test_folder_with_one_junk_gguf_is_read_as_that_file(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(GraftError, match="could not read GGUF file") as err:
        load_model(tmp_path, cache_dir=tmp_path / "cache")
    assert str((tmp_path / "weights.gguf").resolve()) in str(err.value)


def test_folder_with_two_ggufs_lists_them(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(GraftError, match="2 .gguf files") as err:
        load_model(tmp_path)
    assert "a.gguf, b.gguf" in str(err.value) and "\n" not in str(err.value)


def test_empty_folder_is_no_model(tmp_path):
    with pytest.raises(GraftError, match="no config.json.*no .gguf file"):
        load_model(tmp_path)


def test_hub_id_of_the_builtin_is_the_builtin():
    assert is_local_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_local_model("meta-llama/Llama-3.2-1B")
    tokenizer = load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert tokenizer.name_or_path == BUILTIN_NAME


def test_base_for_adapters(tmp_path, tiny_model_dir):
    unnamed = _adapter_naming(tmp_path / "unnamed", "")
    hub_builtin = _adapter_naming(tmp_path / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    local = _adapter_naming(tmp_path / "local", str(tiny_model_dir))
    other_hub = _adapter_naming(tmp_path / "other", "meta-llama/Llama-3.2-1B")
    assert base_for_adapters([unnamed]) == BUILTIN_NAME
    assert base_for_adapters([hub_builtin]) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_for_adapters([unnamed, local]) == str(tiny_model_dir)
    assert base_for_adapters([other_hub, local]) == str(tiny_model_dir)
    with pytest.raises(GraftError, match="pass --model") as err:
        base_for_adapters([other_hub])
    message = str(err.value)
    assert "'meta-llama/Llama-3.2-1B'" in message and str(other_hub) in message
    assert "\n" not in message


def test_cli_other_hub_id_is_a_one_line_error(tmp_path, capsys):
    adapter = _adapter_naming(tmp_path / "other", "meta-llama/Llama-3.2-1B")
    code = cli_main(["generate", "--adapter", str(adapter), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "--model" in err and "\n" not in err


@pytest.mark.slow
def test_peft_adapter_on_a_folder_holding_the_builtin_gguf(tmp_path, smollm2_copy, capsys):
    """The new user's run: PEFT trained on `from_pretrained(folder, gguf_file=...)` and recorded
    the folder; `graftlm generate --adapter DIR` (no --model) loads the GGUF in it."""
    peft = pytest.importorskip("peft")
    model, _ = smollm2_copy
    base_folder = tmp_path / "smollm2"
    base_folder.mkdir()
    (base_folder / builtin_gguf_path().name).symlink_to(builtin_gguf_path())
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = peft.get_peft_model(model, config)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    config_path = adapter / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = str(base_folder)
    config_path.write_text(json.dumps(data))

    def generate(*flags):
        argv = ["generate", "--adapter", str(adapter), "--prompt", "Name a colour.", *flags]
        assert cli_main([*argv, "--max-new-tokens", "8"]) == 0
        return capsys.readouterr().out

    text = generate()
    assert text.strip()
    assert text == generate("--model", BUILTIN_NAME)
