"""From outside: `graftlm train-image` on a folder of 20 PNGs (captions in .txt files and in
metadata.jsonl; RGB, RGBA, greyscale, 16-bit and palette images of several sizes) over a base of
the image demo's shape (graftlm.image.small_pipeline, random weights: the demo pretrains the same
shape), and diffusers' `load_lora_weights` reads the file it writes onto that base."""

from __future__ import annotations

import json
import warnings

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from torch.testing import assert_close

from graftlm.cli import main as cli_main
from graftlm.image.lora_files import WEIGHTS_NAME, load_lora_weights
from graftlm.image.small_pipeline import SmallPipelineShape, build_pipeline
from graftlm.image.train import load_pipeline, read_image_folder, to_rgb


def _png(index: int) -> Image.Image:
    """Image `index` of 20: a dark square on a light ground, in one of five modes and sizes."""
    size = [(32, 32), (48, 40), (20, 20), (64, 32), (33, 47)][index % 5]
    grey = Image.new("L", size, 230)
    grey.paste(40, (4, 4, 4 + size[0] // 2, 4 + size[1] // 2))
    mode = ["RGB", "RGBA", "L", "I;16", "P"][index // 4 % 5]
    if mode == "RGBA":
        image = grey.convert("RGBA")
        image.putalpha(grey.point(lambda v: 255 if v < 128 else 0))  # transparent ground
        return image
    if mode == "I;16":
        return Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257)
    return grey.convert(mode)


def _folder(path):
    path.mkdir()
    rows = []
    for i in range(20):
        _png(i).save(path / f"{i:02d}.png")
        caption = "a grey sks square"
        if i % 2:
            (path / f"{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")
        else:
            rows.append(json.dumps({"file_name": f"{i:02d}.png", "text": caption}))
    (path / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _unet_out(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    side = SmallPipelineShape().latent_size
    latents = torch.randn(2, 4, side, side, generator=gen)
    ids = pipe.tokenizer(
        ["a grey sks square", "a red circle"],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    )
    with torch.no_grad():
        states = pipe.text_encoder(ids.input_ids)[0]
        return pipe.unet(latents, torch.tensor([100, 700]), states).sample


def test_any_png_becomes_rgb():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(transparent)).min() == 255  # white, not the black it hides
    wide = Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16))
    assert wide.mode.startswith("I")
    assert np.asarray(to_rgb(wide)).tolist() == np.full((4, 4, 3), 128).tolist()
    assert to_rgb(Image.new("L", (4, 4), 9)).getpixel((0, 0)) == (9, 9, 9)


def test_train_image_from_outside_loads_in_diffusers(tmp_path):
    base = tmp_path / "base"
    build_pipeline(seed=1).save_pretrained(base)
    images = _folder(tmp_path / "images")
    assert len(read_image_folder(images, None)) == 20
    out = tmp_path / "lora"
    argv = ["train-image", "--base", str(base), "--images", str(images), "--out", str(out)]
    assert cli_main([*argv, "--steps", "3", "--lr", "1e-2", "--batch-size", "4"]) == 0
    assert (out / WEIGHTS_NAME).is_file()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(str(base))
        before = _unet_out(pipe)
        pipe.load_lora_weights(str(out))
        theirs = _unet_out(pipe)
    assert (theirs - before).abs().max() > 1e-3  # the LoRA changes the base's outputs

    ours = load_pipeline(base)
    load_lora_weights(out, {"unet": ours.unet})
    assert_close(_unet_out(ours), theirs, rtol=1e-5, atol=1e-5)
