"""`graftlm train-image` on a tiny saved Stable Diffusion pipeline and a folder of tiny PNGs."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from tiny_diffusers import pipeline_folder
from torch.testing import assert_close

from graftlm.cli import main as cli_main
from graftlm.errors import GraftError
from graftlm.image.config import ImageTrainConfig
from graftlm.image.lora_files import WEIGHTS_NAME, load_lora_weights
from graftlm.image.train import (
    denoise_loss,
    encode,
    load_pipeline,
    read_image_folder,
    train_image,
)
from graftlm.train.metrics import MetricsWriter


def _images(folder, n: int = 4):
    """n 32x32 PNGs: red squares on white, at different places, captioned by .txt files (the
    first two) and metadata.jsonl (the rest)."""
    folder.mkdir()
    rows = []
    for i in range(n):
        image = Image.new("RGB", (32, 40), "white")
        image.paste((220, 20, 20), (4 + 3 * i, 6, 20 + 3 * i, 22))
        image.save(folder / f"{i}.png")
        if i < 2:
            (folder / f"{i}.txt").write_text("a red square", encoding="utf-8")
        else:
            rows.append({"file_name": f"{i}.png", "text": "a sks square"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _fixed_loss(pipe, unet, folder) -> float:
    """The denoising loss on fixed noise and timesteps: what training should lower."""
    items = read_image_folder(folder, None)
    latents, states = encode(pipe, items, 16)  # the resolution train-image used
    gen = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad():
        for t in (50, 300, 600, 900):
            noise = torch.randn(latents.shape, generator=gen)
            timesteps = torch.full((latents.shape[0],), t)
            losses.append(denoise_loss(unet, pipe.scheduler, latents, states, noise, timesteps))
    return float(torch.stack(losses).mean())


def test_train_image_writes_a_file_diffusers_loads(tmp_path):
    base = pipeline_folder(tmp_path / "base")
    images = _images(tmp_path / "images")
    out = tmp_path / "out"
    argv = ["train-image", "--base", str(base), "--images", str(images), "--out", str(out)]
    argv += ["--steps", "40", "--lr", "3e-3", "--rank", "4", "--alpha", "4", "--batch-size", "2"]
    assert cli_main(argv) == 0

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert (out / "loss.png").stat().st_size > 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(str(base))
        before = _fixed_loss(pipe, pipe.unet, images)
        pipe.load_lora_weights(str(out), weight_name=WEIGHTS_NAME)
        theirs = _fixed_loss(pipe, pipe.unet, images)
    print(f"fixed-batch denoising loss: base {before:.4f}, with the LoRA {theirs:.4f}")
    assert theirs < 0.9 * before, (before, theirs)  # the LoRA learned the images

    ours = load_pipeline(base)
    load_lora_weights(out, {"unet": ours.unet})
    assert_close(_fixed_loss(ours, ours.unet, images), theirs, rtol=1e-5, atol=1e-6)

    # generate-image: a PNG of the pipeline's size; the LoRA changes it
    pngs = {}
    for label, extra in (("base", []), ("lora", ["--adapter", str(out)])):
        png = tmp_path / f"{label}.png"
        argv = ["generate-image", "--base", str(base), "--prompt", "a sks square"]
        assert cli_main([*argv, "--out", str(png), "--steps", "2", *extra]) == 0
        pngs[label] = np.asarray(Image.open(png), dtype=np.float32)
    assert pngs["base"].shape == (16, 16, 3)  # sample_size 16, a VAE that does not downsample
    assert np.abs(pngs["base"] - pngs["lora"]).mean() > 0.5


def test_image_folder_errors(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    with pytest.raises(GraftError, match="no images"):
        read_image_folder(folder, None)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    with pytest.raises(GraftError, match=r"a\.png: no caption .* \(--prompt\)"):
        read_image_folder(folder, None)
    assert read_image_folder(folder, "a photo of sks") == [(folder / "a.png", "a photo of sks")]
    (folder / "metadata.jsonl").write_text('{"file_name": "b.png", "text": "x"}\n')
    with pytest.raises(GraftError, match=r"metadata\.jsonl:1: file_name 'b.png' not found"):
        read_image_folder(folder, None)
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(GraftError, match=r"metadata\.jsonl:1: needs a string 'text'"):
        read_image_folder(folder, None)
    with pytest.raises(GraftError, match="targets 'convs': choose one of"):
        ImageTrainConfig(base="b", images="i", out="o", targets="convs")
    with pytest.raises(GraftError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path)


def test_resume_continues_to_the_same_numbers(tmp_path, monkeypatch):
    """A run stopped after its step-2 checkpoint and resumed ends with the same LoRA and loss
    rows as the run that was never stopped."""
    base = pipeline_folder(tmp_path / "base")
    images = _images(tmp_path / "images")

    def config(out, **changes):
        settings = {"base": str(base), "images": str(images), "out": str(out), "steps": 4}
        return ImageTrainConfig(**settings, save_every=2, lr=1e-3, batch_size=2, **changes)

    whole = train_image(config(tmp_path / "whole"))
    assert not (tmp_path / "whole" / "checkpoint").exists()  # removed once the file is written

    append = MetricsWriter.append

    def stop_at_step_3(self, row, eval_row):
        if row["step"] == 3:
            raise KeyboardInterrupt
        append(self, row, eval_row)

    monkeypatch.setattr(MetricsWriter, "append", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_image(config(tmp_path / "cut"))
    monkeypatch.setattr(MetricsWriter, "append", append)
    with pytest.raises(GraftError, match="already holds a run .* use --resume"):
        train_image(config(tmp_path / "cut"))
    with pytest.raises(GraftError, match=r"settings differ .* lr: checkpoint 0\.001, now 0\.002"):
        train_image(dataclasses.replace(config(tmp_path / "cut", resume=True), lr=2e-3))
    resumed = train_image(config(tmp_path / "cut", resume=True))

    def rows(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows(tmp_path / "cut")] == list(range(1, 5))
    assert [r["loss"] for r in rows(tmp_path / "cut")] == [
        r["loss"] for r in rows(tmp_path / "whole")
    ]
    ours, theirs = load_file(str(resumed)), load_file(str(whole))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
