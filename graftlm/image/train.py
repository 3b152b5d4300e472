"""`graftlm train-image`: DreamBooth-style LoRA on a diffusers Stable Diffusion pipeline folder.

The steps, as diffusers' `train_dreambooth_lora.py` takes them::

    images ──► VAE encode once (mean latent x scaling factor) ──► latents z      (cached)
    captions ──► frozen text encoder once ──► h                                  (cached)
    each step: t ~ U[0, T), ε ~ N(0, I), z_t = scheduler.add_noise(z, ε, t)
               loss = MSE(UNet+LoRA(z_t, t, h), ε)   (v-prediction schedulers: the velocity)

Only the UNet's LoRA trains. The out folder gets `pytorch_lora_weights.safetensors` (diffusers'
layout, `pipe.load_lora_weights(out)` reads it), `metrics.jsonl` and `loss.png`.

Images come from a folder: PNG / JPEG / WebP files with a caption each, in `metadata.jsonl`
(`{"file_name": ..., "text": ...}` rows, as diffusers' ImageFolder reads them) or in a `.txt`
file beside the image; `prompt` (an instance prompt) captions the images that have neither.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from graftlm.errors import GraftError
from graftlm.image.config import ImageTrainConfig
from graftlm.image.lora_files import save_lora_weights
from graftlm.image.presets import PRESETS
from graftlm.methods.lora.config import LoraConfig
from graftlm.methods.lora.inject import inject
from graftlm.train import checkpoint
from graftlm.train.metrics import MetricsWriter, progress_bar

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_image_folder(folder: str | Path, prompt: str | None) -> list[tuple[Path, str]]:
    """(image file, caption) for every image in `folder`, sorted by name.

    Raises:
        GraftError: no images; an image with no caption and no `prompt`; a bad metadata.jsonl
            line (file and line named); a metadata row naming a missing file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GraftError(f"{folder}: no such image folder")
    captions: dict[str, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GraftError(f"{metadata}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise GraftError(f"{metadata}:{number}: needs a string 'file_name'")
            if not isinstance(row.get("text"), str):
                raise GraftError(f"{metadata}:{number}: needs a string 'text' (the caption)")
            if not (folder / row["file_name"]).is_file():
                raise GraftError(f"{metadata}:{number}: file_name {row['file_name']!r} not found")
            captions[row["file_name"]] = row["text"]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise GraftError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for path in files:
        caption = captions.get(path.name)
        if caption is None and path.with_suffix(".txt").is_file():
            caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if caption is None:
            caption = prompt
        if caption is None:
            raise GraftError(
                f"{path}: no caption (no {path.with_suffix('.txt').name}, no metadata.jsonl "
                "row); give one, or an instance prompt (--prompt)"
            )
        out.append((path, caption))
    return out


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB. Transparent pixels become white (PIL's own convert would make
    them whatever colour they hide, often black); 16-bit greys are scaled to 8 bits (PIL's
    convert clips them at 255, so most of an image turns white)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        grey = np.asarray(image, dtype=np.float32) / 257.0
        image = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """An image as `[3, resolution, resolution]` in [-1, 1]: any mode as RGB (`to_rgb`), resized
    (short side) and center-cropped, as diffusers' training scripts do."""
    try:
        with Image.open(path) as opened:
            image = to_rgb(opened)
    except (UnidentifiedImageError, OSError) as exc:
        raise GraftError(f"{path}: not a readable image ({exc})") from None
    scale = resolution / min(image.size)
    size = (
        max(resolution, round(image.width * scale)),
        max(resolution, round(image.height * scale)),
    )
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)


def load_pipeline(base: str | Path):
    """The diffusers pipeline in `base` (diffusers is imported here: an optional extra)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise GraftError(
            "graftlm train-image needs diffusers: pip install 'graftlm[image]'"
        ) from None
    if not (Path(base) / "model_index.json").is_file():
        raise GraftError(f"{base}: not a diffusers pipeline folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(str(base), torch_dtype=torch.float32)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise GraftError(f"{base}: the pipeline has no {part}")
    return pipe


@torch.no_grad()
def encode(pipe, items: list[tuple[Path, str]], resolution: int):
    """(latents `[n, c, h, w]`, text states `[n, tokens, dim]`) of the images and captions,
    computed once: the VAE and the text encoder stay frozen."""
    pixels = torch.stack([load_pixels(path, resolution) for path, _ in items])
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    tokens = pipe.tokenizer(
        [caption for _, caption in items],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    states = pipe.text_encoder(tokens.input_ids)[0]
    return latents, states


def denoise_loss(unet, scheduler, latents, states, noise, timesteps) -> torch.Tensor:
    """The MSE between the UNet's prediction on the noised latents and its target (the noise,
    or the velocity for a v-prediction scheduler)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, states).sample
    return F.mse_loss(prediction.float(), target.float())


def train_image(config: ImageTrainConfig) -> Path:
    """Train a LoRA on the pipeline's UNet as `config` says; returns the LoRA file written.

    Raises:
        GraftError: a missing or malformed pipeline, image folder, image or caption.
    """
    items = read_image_folder(config.images, config.prompt)
    pipe = load_pipeline(config.base)
    unet, scheduler = pipe.unet, pipe.scheduler
    resolution = config.resolution or unet.config.sample_size * pipe.vae_scale_factor
    latents, states = encode(pipe, items, resolution)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsWriter(out)
    # what a resumed run must share with the checkpointed one: everything but where it writes
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "resume")}
    state = checkpoint.read(out) if config.resume else None
    if config.resume and state is None:
        raise GraftError(f"--resume: no checkpoint in {out / checkpoint.FOLDER}")
    if state is None and metrics.exists():
        raise GraftError(
            f"{out} already holds a run (metrics.jsonl); use --resume or another --out"
        )
    if state is not None:
        checkpoint.check_settings(state, config, settings)

    torch.manual_seed(config.seed)  # A's init, then batches, noise, timesteps (checkpointed)
    inject(unet, LoraConfig(rank=config.rank, alpha=config.alpha, targets=PRESETS[config.targets]))
    unet.train()
    names = {id(p): n for n, p in unet.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=config.lr)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    first, elapsed = 0, 0.0
    if state is not None:
        first, elapsed = checkpoint.restore(state, unet, optimizer, constant, names)
        metrics.truncate(first)
    start = time.perf_counter() - elapsed
    bar = progress_bar(config.steps, first, enabled=sys.stderr.isatty())
    for step in range(first + 1, config.steps + 1):
        rows = torch.randint(0, len(items), (config.batch_size,))
        batch = latents[rows]
        noise = torch.randn(batch.shape)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,))
        loss = denoise_loss(unet, scheduler, batch, states[rows], noise, timesteps)
        if not torch.isfinite(loss):
            raise GraftError(f"step {step}: the loss is {loss.item()} (try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        constant.step()
        row = {"step": step, "loss": loss.item(), "lr": config.lr}
        row["seconds"] = round(time.perf_counter() - start, 3)
        metrics.append(row, None)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if step % config.save_every == 0 and step < config.steps:
            checkpoint.write(
                out, unet, optimizer, constant, names,
                step=step, elapsed_s=time.perf_counter() - start, cfg=config, settings=settings,
            )  # fmt: skip
    bar.close()
    unet.eval()
    path = save_lora_weights(out, {"unet": unet})
    metrics.plot("denoising MSE")
    checkpoint.remove(out)
    return path
