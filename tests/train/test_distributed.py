"""`graftlm train` under torchrun: 2 CPU processes (gloo), DDP and FSDP2, on the tiny model.

The distributed runs must compute the one-process optimization: the same adapter (to fp32
rounding: the gradient sum is split across ranks), the same losses, files written once (by rank
0), also when the DDP run is killed mid-way (torchrun and both workers, SIGKILL) and resumed.
The FSDP adapter is a plain PEFT folder that generates what the one-process adapter does.

Each torchrun launch costs ~15-20 s here (three Python processes importing torch, two of them
transformers too), so the runs are module fixtures shared by the tests: three launches in all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import torch
from helpers import write_chat
from safetensors.torch import load_file

from graftlm.cli.parser import build_parser
from graftlm.cli.parser import main as cli_main
from graftlm.cli.train import build_train_config
from graftlm.errors import GraftError
from graftlm.train.config import TrainConfig
from graftlm.train.distributed import Runtime
from graftlm.train.launch import kill_tree, train_flags
from graftlm.train.loop import train
from graftlm.train.steps import micro_batches

STEPS = 24
# 5 sequences a step in micro-batches of 2: three micro-batches, so rank 0 runs two and rank 1
# one (plus, under FSDP, a zero-weight padding one); 7 eval rows make one eval batch, which
# rank 1 does not have at all
SETTINGS = dict(
    rank=4,
    batch_size=5,
    micro_batch_size=2,
    steps=STEPS,
    save_every=1,
    eval_every=8,
    dtype="float32",
    lr=5e-3,
    # NEFTune (on in LoRA's recipe) draws its noise per forward pass, so its draws depend on
    # which process runs which rows; these tests check the processes' arithmetic alone
    neftune_alpha=0.0,
)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _torchrun(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        + ["-m", "graftlm", "train", *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-3000:]
    return output


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny model, data, and the one-process reference run."""
    root = tmp_path_factory.mktemp("dist")
    model = helpers.save_tiny_model_dir(root / "tiny-llama", "llama")
    data = write_chat(root / "train.jsonl", 60)
    eval_data = write_chat(root / "eval.jsonl", 7, seed=1)
    cfg = TrainConfig(
        data=str(data),
        eval_data=str(eval_data),
        out=str(root / "single"),
        model=str(model),
        **SETTINGS,
    )
    train(cfg, progress=False)
    return {"root": root, "cfg": cfg, "model": model, "single": root / "single"}


def _args(workspace, out: Path, *extra: str) -> list[str]:
    cfg = TrainConfig(**{**workspace["cfg"].to_dict(), "out": str(out)})
    return [*train_flags(cfg), "--quiet", *extra]


@pytest.fixture(scope="module")
def ddp_run(workspace):
    """A DDP run killed after a checkpoint (torchrun and both workers, SIGKILL), then resumed
    with `graftlm train --nproc 2 --resume`; both started from an empty working folder."""
    out = workspace["root"] / "ddp"
    cwd = workspace["root"] / "ddp-cwd"
    cwd.mkdir()
    proc = _torchrun(_args(workspace, out), cwd=cwd, start_new_session=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 180
    while True:
        try:
            if json.loads(state.read_text())["step"] >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    # a crash: torchrun and both workers (they run in sessions of their own) die at once
    kill_tree(proc.pid)
    proc.communicate(timeout=60)
    finished_before_kill = (out / "adapter_model.safetensors").exists()
    killed_at = json.loads(state.read_text())["step"]
    resumed = subprocess.Popen(
        [sys.executable, "-m", "graftlm", "train", *_args(workspace, out, "--resume")]
        + ["--nproc", "2"],
        env=_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return {
        "out": out,
        "cwd": cwd,
        "log": _finish(resumed),
        "killed_at": killed_at,
        "finished_before_kill": finished_before_kill,
    }


@pytest.fixture(scope="module")
def fsdp_run(workspace):
    out = workspace["root"] / "fsdp"
    return {"out": out, "log": _finish(_torchrun(_args(workspace, out, "--fsdp")))}


def _assert_same_training(reference: Path, other: Path) -> None:
    ref, got = _weights(reference), _weights(other)
    assert ref.keys() == got.keys()
    for key in ref:
        assert got[key].shape == ref[key].shape, key  # whole tensors, not a rank's shard
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-6, msg=key)
    ref_rows, got_rows = _rows(reference), _rows(other)
    assert [r["step"] for r in got_rows] == [r["step"] for r in ref_rows]
    for a, b in zip(ref_rows, got_rows):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a, b)
        for key in ("tokens", "labelled_tokens", "eval_tokens"):
            assert a.get(key) == b.get(key), (a, b)


def test_ddp_matches_one_process_and_only_rank0_writes(workspace, ddp_run):
    out = ddp_run["out"]
    _assert_same_training(workspace["single"], out)
    # rank 1 wrote nothing: each step is logged once (two writers would append twice), the
    # folder holds what a one-process run writes, and nothing appeared in the working folder
    assert [r["step"] for r in _rows(out) if "loss" in r] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in workspace["single"].iterdir()
    )
    assert list(ddp_run["cwd"].iterdir()) == []
    assert ddp_run["log"].count("adapter written to") == 1
    assert "(2 processes)" in ddp_run["log"]


def test_ddp_resumes_after_every_process_was_killed(workspace, ddp_run):
    # the adapter equals the uninterrupted one-process run's (test above); here: the kill
    # really landed mid-run, and the resumed run continued from the checkpoint
    assert not ddp_run["finished_before_kill"], "the run finished before the kill"
    assert 3 <= ddp_run["killed_at"] < STEPS
    assert f"resumed from step {ddp_run['killed_at']}/{STEPS}" in ddp_run["log"]


def test_fsdp_matches_one_process(workspace, fsdp_run):
    _assert_same_training(workspace["single"], fsdp_run["out"])
    assert "FSDP: 2 decoder layers sharded over 2 processes" in fsdp_run["log"]
    config = json.loads((fsdp_run["out"] / "adapter_config.json").read_text())
    assert config["r"] == 4


def test_fsdp_adapter_loads_in_peft_and_generates_like_one_process(workspace, fsdp_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = helpers.tiny_tokenizer()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "item 7 is"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids

    def run(adapter: Path | None) -> tuple[torch.Tensor, str]:
        model = AutoModelForCausalLM.from_pretrained(workspace["model"], dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            tokens = model.generate(
                input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=helpers.EOS_ID
            )
        return logits, tokenizer.decode(tokens[0, ids.shape[1] :])

    base_logits, _ = run(None)
    fsdp_logits, fsdp_text = run(fsdp_run["out"])
    single_logits, single_text = run(workspace["single"])
    assert not torch.allclose(fsdp_logits, base_logits, atol=1e-3), "the adapter did nothing"
    torch.testing.assert_close(fsdp_logits, single_logits, rtol=1e-4, atol=1e-4)
    assert fsdp_text == single_text


# -- the pieces, in one process ---------------------------------------------------------------


def test_from_env_reads_torchrun_variables_and_refuses_half_set_ones():
    assert Runtime.from_env({}) == Runtime.single()
    one = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "x"}
    with pytest.raises(GraftError, match="MASTER_PORT missing"):
        Runtime.from_env(one)
    assert Runtime.from_env({**one, "MASTER_PORT": "29500"}).world_size == 1
    with pytest.raises(GraftError, match=r"RANK set but WORLD_SIZE, LOCAL_RANK, .* missing"):
        Runtime.from_env({"RANK": "1"})
    bad = {**one, "MASTER_PORT": "1", "RANK": "2", "WORLD_SIZE": "2"}
    with pytest.raises(GraftError, match="RANK < WORLD_SIZE"):
        Runtime.from_env(bad)
    with pytest.raises(GraftError, match="WORLD_SIZE should be an integer"):
        Runtime.from_env({**bad, "WORLD_SIZE": "two"})


def test_shares_are_disjoint_and_fsdp_pads_with_zero_weight_batches(tmp_path):
    items = [[0, 1], [2, 3], [4]]
    ddp = [Runtime(rank=r, world_size=2).shard(items) for r in range(2)]
    assert ddp == [[[0, 1], [4]], [[2, 3]]]  # the union is exact: nothing counts twice
    assert Runtime(rank=2, world_size=4).shard(items[:2]) == []
    fsdp = [Runtime(rank=r, world_size=4, fsdp=True).shard(items) for r in range(4)]
    assert [len(share) for share in fsdp] == [1, 1, 1, 1]  # lockstep: same count everywhere
    real = [b for share in fsdp for b in share if not Runtime.is_padding(b)]
    assert sorted(real) == sorted(items)
    assert [b for share in fsdp for b in share if Runtime.is_padding(b)] == [[4]]

    from graftlm.data.dataset import Example

    examples = [Example([1] * 10, [1] * 10, f"x:{i}") for i in range(5)]
    cfg = TrainConfig(data="x", out="y", batch_size=5)
    # the default micro-batch (4k tokens) holds all 5 rows; two ranks still both get work
    shares = [micro_batches(list(range(5)), examples, cfg, Runtime(r, 2)) for r in range(2)]
    assert all(shares) and sorted(i for s in shares for b in s for i in b) == list(range(5))


def test_nproc_flags_rebuild_the_config_and_nproc_is_refused_under_torchrun(
    tmp_path, monkeypatch, capsys
):
    cfg = TrainConfig(
        data="d.jsonl", out="o", targets="-weird", alpha=3.5, fsdp=True, steps=7, lr=1e-3
    )
    args = build_parser().parse_args(["train", *train_flags(cfg)])
    assert build_train_config(args) == cfg
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = write_chat(tmp_path / "train.jsonl", 4)
    code = cli_main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--nproc", "2"])
    assert code == 2
    assert "--nproc starts torchrun itself" in capsys.readouterr().err
