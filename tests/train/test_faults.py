"""Faults during training: SIGKILL in the middle of checkpoint writes and adapter saves, a full
disk, a read-only `--out`, a loss that is not finite, and two runs on one `--out`."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import torch

import graftlm
from graftlm.adapters.folder import STAGING, read_config, read_graft, read_weights
from graftlm.adapters.io import save_trained
from graftlm.cli.parser import main as cli_main
from graftlm.errors import GraftError
from graftlm.train import checkpoint
from graftlm.train.config import TrainConfig
from graftlm.train.guard import LOCK_FILE, claim_out
from graftlm.train.loop import train

KILLS = 60


class Saver:
    """A tiny LoRA model whose every trainable number is `gen`, saved as adapter + checkpoint;
    the adapter's three files each name the generation (config, graftlm.json, weights)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.model = helpers.tiny_llama()
        graftlm.inject(self.model, graftlm.LoraConfig(rank=4, alpha=8, targets="all-linear"))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.names = {id(p): n for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.cfg = TrainConfig(data="d.jsonl", out=str(out))

    def save(self, gen: int) -> None:
        with torch.no_grad():
            for p in self.params:
                p.fill_(float(gen))
        self.model.config.name_or_path = f"gen-{gen}"
        save_trained(self.model, self.out, "lora", training={"gen": gen})
        checkpoint.write(
            self.out, self.model, self.optimizer, self.scheduler, self.names,
            step=gen, elapsed_s=0.0, cfg=self.cfg,
        )  # fmt: skip


def complete_generations(out: Path) -> tuple[int, int]:
    """(the adapter's generation, the checkpoint's step), each checked to be whole."""
    config = read_config(out)  # finishes a save killed among its renames
    gen = int(config["base_model_name_or_path"].removeprefix("gen-"))
    assert read_graft(out)["training"] == {"gen": gen}
    for key, tensor in read_weights(out).items():
        assert torch.all(tensor == gen), f"{key} holds another generation than {gen}"
    state = checkpoint.read(out)
    step = state["meta"]["step"]
    params = {k: v for k, v in state["tensors"].items() if k.startswith("param/")}
    assert params and all(torch.all(v == step) for v in params.values())
    return gen, step


def test_sigkill_during_saves_leaves_the_old_or_the_new_adapter_and_checkpoint(tmp_path):
    out = tmp_path / "out"
    saver = Saver(out)
    start = time.perf_counter()
    saver.save(0)
    one_save = time.perf_counter() - start
    rng = random.Random(1234)
    seen, caught_mid_write, gen, step = set(), 0, 0, 0
    for _ in range(KILLS):
        ready, done = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child saves generations in a loop until it is killed
            try:
                os.close(ready)
                torch.set_num_threads(1)
                for g in itertools.count(max(gen, step) + 1):
                    saver.save(g)
                    os.write(done, b".")  # one more whole generation
            finally:
                os._exit(1)
        os.close(done)
        # after the child's first whole save (so that every kill finds progress to keep), at a
        # random point of the next ones, however slow this machine is today
        assert select.select([ready], [], [], 60)[0], "the saving child made no progress"
        time.sleep(rng.uniform(0.0, 1.5 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready)
        leftovers = [p.name for p in out.iterdir() if p.name.startswith((STAGING, "checkpoint."))]
        caught_mid_write += bool(leftovers)
        new_gen, new_step = complete_generations(out)
        assert new_gen >= gen and new_step >= step  # never back to an older one, nor a mix
        gen, step = new_gen, new_step
        seen.add((gen, step))
    # the kills landed at many points, many of them in the middle of a write
    assert len(seen) >= KILLS // 2 and caught_mid_write >= 10, (len(seen), caught_mid_write)
    last = max(gen, step) + 1
    saver.save(last)  # what a kill left behind does not stop the next save
    assert complete_generations(out) == (last, last)
    assert not [p for p in out.iterdir() if p.name.startswith(STAGING)]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_is_a_clear_error_and_keeps_the_previous_save(tmp_path, monkeypatch):
    out = tmp_path / "out"
    saver = Saver(out)
    saver.save(1)
    monkeypatch.setattr("graftlm.train.checkpoint.save_file", enospc)
    with pytest.raises(GraftError, match="No space left on device") as err:
        saver.save(2)  # the adapter is saved first: generation 2 of it is written
    assert "checkpoint of step 2" in str(err.value) and "step 1 is intact" in str(err.value)
    assert checkpoint.read(out)["meta"]["step"] == 1
    monkeypatch.setattr("graftlm.adapters.folder.save", enospc)  # the safetensors serializer
    with pytest.raises(GraftError, match="No space left on device.*keeps its previous adapter"):
        saver.save(3)
    assert read_config(out)["base_model_name_or_path"] == "gen-2"
    assert all(torch.all(t == 2) for t in read_weights(out).values())
    assert not [p for p in out.iterdir() if p.name.startswith((STAGING, "checkpoint.tmp"))]


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A real small file system (needs root and mount rights; the test is skipped without)."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_real_full_disk(tmp_path):
    with tmpfs(tmp_path / "small", "size=512k") as disk:
        out = disk / "out"
        saver = Saver(out)
        saver.save(1)
        filler = disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as handle:  # fill what is left
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
        with pytest.raises(GraftError, match="No space left on device"):
            saver.save(2)
        filler.unlink()
        assert complete_generations(out)[1] == 1  # the checkpoint of step 1 is whole
        saver.save(3)
        assert complete_generations(out) == (3, 3)


def test_a_read_only_out_fails_at_the_start(tmp_path, tiny_model_dir, capsys):
    with tmpfs(tmp_path / "ro", "size=64k,ro") as disk:
        data = helpers.write_chat(tmp_path / "train.jsonl", 8)
        argv = ["train", "--data", str(data), "--model", str(tiny_model_dir)]
        start = time.perf_counter()
        assert cli_main([*argv, "--out", str(disk / "run"), "--steps", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out") and "not writable" in err and "Read-only" in err
        assert "\n" not in err and time.perf_counter() - start < 5  # before any model load


def test_a_nan_loss_stops_naming_step_and_rows_and_keeps_the_last_checkpoint(
    tmp_path, tiny_model_dir, monkeypatch
):
    from graftlm.train.step import OptimizerStep

    real = OptimizerStep.__call__

    def diverging(self, step, indices, labelled):
        if step == 2:  # the third step: its weights have diverged
            with torch.no_grad():
                next(p for p in self.params).fill_(float("nan"))
        return real(self, step, indices, labelled)

    monkeypatch.setattr(OptimizerStep, "__call__", diverging)
    cfg = helpers.base_cfg(tmp_path, tiny_model_dir, steps=6, save_every=2)
    with pytest.raises(GraftError) as err:
        train(cfg, progress=False)
    message = str(err.value)
    assert message.startswith("step 3: the loss is nan")
    assert "train.jsonl:" in message and "step 2" in message
    state = checkpoint.read(Path(cfg.out))
    assert state["meta"]["step"] == 2
    assert all(
        torch.isfinite(t).all() for k, t in state["tensors"].items() if k.startswith("param/")
    )
    assert not (Path(cfg.out) / "adapter_config.json").exists()


HOLDER = """
import sys, time
from graftlm.train.guard import claim_out
with claim_out(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_one_out_is_refused_until_the_first_dies(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        data = helpers.write_chat(tmp_path / "train.jsonl", 8)
        argv = ["train", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out)]
        assert cli_main([*argv, "--steps", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert "in use by another graftlm train" in err and f"pid {holder.pid}" in err
        with pytest.raises(GraftError, match="in use"):
            with claim_out(out):
                pass
    finally:
        holder.kill()  # SIGKILL: no chance to clean up, the kernel drops the lock
        holder.wait()
    assert (out / LOCK_FILE).exists()
    with claim_out(out):  # the stale lock file does not block
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    with claim_out(out):  # released on exit from the block
        pass
    assert not (out / LOCK_FILE).exists()  # a run that ends leaves only its outputs


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(GraftError, match="not writable"):
        with claim_out(tmp_path / "file"):
            pass


def test_checkpoint_killed_between_its_renames_is_recovered(tmp_path):
    """The one window where only `.old` is whole: the next write must not delete it first."""
    out = tmp_path / "out"
    saver = Saver(out)
    saver.save(1)
    (out / "checkpoint").rename(out / "checkpoint.old")  # as a kill between the renames leaves
    (out / "checkpoint.tmp").mkdir()
    assert checkpoint.read(out)["meta"]["step"] == 1
    real = checkpoint.save_file
    calls = []

    def killed_while_writing(*args, **kwargs):
        calls.append(1)
        raise OSError(errno.EIO, "simulated crash")

    checkpoint.save_file = killed_while_writing
    try:
        with pytest.raises(GraftError):
            saver.save(2)
    finally:
        checkpoint.save_file = real
    assert calls and checkpoint.read(out)["meta"]["step"] == 1
    assert json.loads((out / "checkpoint" / checkpoint.META).read_text())["step"] == 1
