"""Pretrain the image demo's base: a small Stable Diffusion pipeline folder, on synthetic shapes.

    .venv/bin/python examples/image/make_base.py --out bases/shapes      (make image-base)

No Stable Diffusion weights can be downloaded here, so this builds one of the same kind from
scratch (graftlm.image.small_pipeline: a byte-level CLIP tokenizer and text encoder, an
AutoencoderKL, a UNet2DConditionModel, a DDIM scheduler) and pretrains it on 32x32 images of
red / green / blue circles, squares and triangles, captioned "a red circle", ...:

1. the VAE, as an autoencoder (reconstruction MSE + a small KL term) on those images and as many
   random irregular polygons of random colours (a codec for pictures of every such kind, as SD's
   VAE is for photos), so its latents mean something (a random VAE's latents decode to noise);
   its scaling_factor makes them unit-variance;
2. the UNet, on those latents with the denoising loss train-image uses, one caption in ten
   dropped to "" so classifier-free guidance works. The text encoder stays random and frozen: it
   still tells the captions apart, byte by byte.

The folder is an ordinary diffusers pipeline: `StableDiffusionPipeline.from_pretrained(DIR)`,
`pipe.load_lora_weights(...)` and `graftlm train-image --base DIR` read it. Deterministic from
--seed at one thread (the default); samples.png in the folder shows what it draws.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from shapes import BASE_SHAPES, COLORS, caption, dataset, draw_polygon

from graftlm.image.small_pipeline import SmallPipelineShape, build_pipeline


def to_pixels(images) -> torch.Tensor:
    """PIL images -> [n, 3, h, w] in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array / 127.5 - 1.0).permute(0, 3, 1, 2)


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def grid(images, columns: int, zoom: int = 2) -> Image.Image:
    side = images[0].width
    rows = math.ceil(len(images) / columns)
    out = Image.new("RGB", (columns * side, rows * side), "white")
    for i, image in enumerate(images):
        out.paste(image, ((i % columns) * side, (i // columns) * side))
    return out.resize((out.width * zoom, out.height * zoom), Image.Resampling.NEAREST)


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vae(vae, pixels: torch.Tensor, steps: int, batch: int, lr: float, gen) -> None:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 20)
        rows = torch.randint(0, len(pixels), (batch,), generator=gen)
        posterior = vae.encode(pixels[rows]).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(latents).sample
        loss = F.mse_loss(recon, pixels[rows]) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report("vae ", step, steps, f"mse {loss.item():.4f}", start)
    vae.eval()


def report(part: str, step: int, steps: int, value: str, start: float) -> None:
    """A progress line every 50 steps and at the last."""
    if step % 50 == 0 or step == steps - 1:
        print(
            f"  {part} step {step + 1:4d}/{steps}  {value}  {time.perf_counter() - start:5.0f} s",
            flush=True,
        )


def train_unet(unet, scheduler, latents, states, empty, steps, batch, lr, gen) -> None:
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    average = None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 50)
        rows = torch.randint(0, len(latents), (batch,), generator=gen)
        context = states[rows].clone()
        drop = torch.rand(batch, generator=gen) < 0.1  # classifier-free guidance's unconditional
        context[drop] = empty
        noise = torch.randn(latents[rows].shape, generator=gen)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = scheduler.add_noise(latents[rows], noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        average = loss.item() if average is None else 0.95 * average + 0.05 * loss.item()
        report("unet", step, steps, f"loss {average:.4f}", start)
    unet.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bases/shapes", help="the pipeline folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=3000, help="synthetic training images")
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--unet-steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: deterministic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    started = time.perf_counter()

    shape = SmallPipelineShape()
    pipe = build_pipeline(shape, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rows = dataset(BASE_SHAPES, args.images, args.seed, shape.resolution)
    pixels = to_pixels([image for image, _, _ in rows])
    print(
        f"{len(rows)} images of {', '.join(BASE_SHAPES)} in {', '.join(COLORS)}; "
        f"UNet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f} M parameters, "
        f"VAE {sum(p.numel() for p in pipe.vae.parameters()) / 1e6:.2f} M",
        flush=True,
    )

    print("1/3 the VAE, as an autoencoder (the shapes and as many random polygons)", flush=True)
    polygons = random.Random(args.seed + 1)
    generic = to_pixels([draw_polygon(polygons, shape.resolution) for _ in range(args.images)])
    train_vae(pipe.vae, torch.cat([pixels, generic]), args.vae_steps, args.batch // 2, 2e-3, gen)
    with torch.no_grad():
        means = torch.cat([pipe.vae.encode(p).latent_dist.mean for p in pixels.split(256)])
        pipe.vae.register_to_config(scaling_factor=float(1 / means.std()))
        latents = means * pipe.vae.config.scaling_factor

    print("2/3 the captions, through the frozen text encoder", flush=True)
    with torch.no_grad():
        captions = [text for _, text, _ in rows]
        tokens = pipe.tokenizer(
            captions + [""],
            padding="max_length",
            truncation=True,
            max_length=pipe.tokenizer.model_max_length,
            return_tensors="pt",
        )
        states = pipe.text_encoder(tokens.input_ids)[0]
        states, empty = states[:-1], states[-1]

    print("3/3 the UNet, denoising the latents", flush=True)
    train_unet(
        pipe.unet, pipe.scheduler, latents, states, empty, args.unet_steps, args.batch, 1e-3, gen
    )

    out = Path(args.out)
    pipe.save_pretrained(out)
    prompts = [caption(s, c) for s in BASE_SHAPES for c in COLORS]
    with torch.no_grad():
        images = pipe(
            prompts,
            num_inference_steps=20,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="pil",
        ).images
    grid(images, len(COLORS), zoom=3).save(out / "samples.png")
    info = {
        "seed": args.seed,
        "images": args.images,
        "vae_steps": args.vae_steps,
        "unet_steps": args.unet_steps,
        "batch": args.batch,
        "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "graftlm_base.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(f"base written to {out} in {info['seconds']:.0f} s (samples: {out / 'samples.png'})")


if __name__ == "__main__":
    main()
