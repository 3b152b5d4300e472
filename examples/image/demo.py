"""The image demo: teach the small base (make_base.py) a new shape (a heart) from 20 images.

    .venv/bin/python examples/image/demo.py --base bases/shapes      (make image-demo)

1. 20 images of hearts (red, green, blue), captioned "a red heart", ... by a .txt beside each;
2. a small CNN that tells circles, squares, triangles and hearts apart, trained on fresh synthetic
   images of all four as the base's VAE renders them (the judge: it never sees a generated
   image while it learns);
3. before: the base draws 8 samples per "a <colour> heart" prompt (fixed seeds); the judge scores
   the share that are hearts; the base's own shapes are scored too;
4. `graftlm train-image` on the 20 images, through the CLI, as a user runs it, with 20 images the
   base drew itself of its own shapes (DreamBooth's prior preservation; --keep 0: without);
5. after: diffusers' own `pipe.load_lora_weights` puts the LoRA file on the base, and the same
   prompts and seeds are drawn and scored again.

Grids (PNG) and results.json go to --work; --docs copies the grids there (the README's images).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from make_base import grid, to_pixels
from shapes import BASE_SHAPES, COLORS, NEW_SHAPE, caption, dataset, draw

ALL_SHAPES = (*BASE_SHAPES, NEW_SHAPE)


def judge(seed: int, vae, steps: int = 300) -> torch.nn.Module:
    """A small CNN over 32x32 images: which of ALL_SHAPES it is. It learns from drawn images as
    the base's VAE renders them (encoded and decoded), so a sample is judged by its shape, not by
    the codec's soft edges; it never sees a generated image."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(64, len(ALL_SHAPES)),
    )  # fmt: skip

    def rendered(rows):
        with torch.no_grad():
            pixels = to_pixels([r[0] for r in rows]).split(250)
            return torch.cat([vae.decode(vae.encode(p).latent_dist.mean).sample for p in pixels])

    rows, held = dataset(ALL_SHAPES, 4000, seed + 1), dataset(ALL_SHAPES, 400, seed + 2)
    pixels, labels = rendered(rows), torch.tensor([r[2] for r in rows])
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, len(rows), (64,), generator=gen)
        x = pixels[batch] + 0.05 * torch.randn(pixels[batch].shape, generator=gen)
        loss = F.cross_entropy(net(x), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        guess = net(rendered(held)).argmax(1)
    accuracy = (guess == torch.tensor([r[2] for r in held])).float().mean().item()
    print(f"judge: {accuracy:.3f} accuracy on 400 held-out drawn images (VAE-rendered)", flush=True)
    return net


def sample(pipe, prompts: list[str], seed: int, steps: int, guidance: float):
    with torch.no_grad():
        return pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts))],
        ).images


def score(net, images, shape: str) -> float:
    """The share of `images` the judge calls `shape`."""
    with torch.no_grad():
        guess = net(to_pixels(images)).argmax(1)
    return (guess == ALL_SHAPES.index(shape)).float().mean().item()


def draw_and_score(pipe, net, args, label: str, work: Path) -> dict:
    per_color = args.samples // len(COLORS)
    new_prompts = [caption(NEW_SHAPE, c) for c in COLORS for _ in range(per_color)]
    drawn = sample(pipe, new_prompts, args.seed, args.sample_steps, args.guidance)
    grid(drawn, per_color, zoom=2).save(work / f"{label}.png")
    result = {f"{NEW_SHAPE}_share": score(net, drawn, NEW_SHAPE)}
    for shape in BASE_SHAPES:  # what the base knew: kept?
        prompts = [caption(shape, c) for c in COLORS for _ in range(2)]
        result[f"{shape}_share"] = score(
            net, sample(pipe, prompts, args.seed, args.sample_steps, args.guidance), shape
        )
    print(f"{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="bases/shapes", help="make_base.py's folder")
    parser.add_argument("--work", default="runs/image-demo", help="images, LoRA, grids, results")
    parser.add_argument("--docs", help="also copy the grids here (e.g. docs/images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--samples", type=int, default=24, help="samples of the new shape, before and after"
    )
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=800, help="train-image's steps")
    parser.add_argument("--lr", type=float, default=2e-3, help="train-image's learning rate")
    parser.add_argument("--targets", default="attention+conv", help="train-image's --targets")
    parser.add_argument(
        "--keep", type=int, default=20, help="the base's own samples trained beside (0: none)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    base, work = Path(args.base), Path(args.work)
    if not (base / "model_index.json").is_file():
        sys.exit(f"error: {base}: no base; make it first: make image-base")
    if work.exists():
        shutil.rmtree(work)
    images = work / "images"
    images.mkdir(parents=True)
    started = time.perf_counter()

    rng = random.Random(args.seed + 100)  # not make_base's stream: shapes of their own
    shown = []
    for i in range(20):
        color = list(COLORS)[i % len(COLORS)]
        shown.append(draw(NEW_SHAPE, color, rng))
        shown[-1].save(images / f"{NEW_SHAPE}_{i:02d}.png")
        (images / f"{NEW_SHAPE}_{i:02d}.txt").write_text(
            caption(NEW_SHAPE, color), encoding="utf-8"
        )
    grid(shown, 10).save(work / "training_images.png")

    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    net = judge(args.seed, pipe.vae)
    pipe.set_progress_bar_config(disable=True)
    before = draw_and_score(pipe, net, args, "before", work)
    # DreamBooth's prior preservation: the base's own drawings of what it knows, captioned with
    # their prompts, train beside the new shape, so the LoRA does not redraw every shape as it
    keep = [caption(s, c) for s in BASE_SHAPES for c in COLORS]
    keep = [keep[i % len(keep)] for i in range(args.keep)]
    for i, image in enumerate(
        sample(pipe, keep, args.seed + 1000, args.sample_steps, args.guidance)
    ):
        image.save(images / f"keep_{i:02d}.png")
        (images / f"keep_{i:02d}.txt").write_text(keep[i], encoding="utf-8")

    lora = work / "lora"
    command = [
        sys.executable,
        "-m",
        "graftlm",
        "train-image",
        "--base",
        str(base),
        "--images",
        str(images),
        "--out",
        str(lora),
        "--steps",
        str(args.steps),
        "--lr",
        str(args.lr),
        "--rank",
        "8",
        "--alpha",
        "8",
        "--targets",
        args.targets,
        "--batch-size",
        "4",
        "--seed",
        str(args.seed),
    ]
    print("$ graftlm " + " ".join(command[3:]), flush=True)
    trained = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(command, check=True, env=env)
    train_seconds = time.perf_counter() - trained
    rows = [json.loads(line) for line in (lora / "metrics.jsonl").read_text().splitlines()]
    tenth = max(1, len(rows) // 10)
    first = sum(r["loss"] for r in rows[:tenth]) / tenth
    last = sum(r["loss"] for r in rows[-tenth:]) / tenth

    pipe.load_lora_weights(str(lora))  # diffusers reads graftlm's file
    after = draw_and_score(pipe, net, args, "after", work)
    results = {
        "before": before,
        "after": after,
        "loss_first_tenth": round(first, 4),
        "loss_last_tenth": round(last, 4),
        "train_image_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "steps": args.steps,
        "samples": args.samples,
        "keep": args.keep,
        "targets": args.targets,
        "lr": args.lr,
        "threads": args.threads,
    }
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=1))
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for name in ("before.png", "after.png", "training_images.png"):
            shutil.copy(work / name, docs / f"image_demo_{name}")
        shutil.copy(lora / "loss.png", docs / "image_demo_loss.png")
        if (base / "samples.png").is_file():  # make_base.py's grid of what the base draws
            shutil.copy(base / "samples.png", docs / "image_demo_base_samples.png")


if __name__ == "__main__":
    main()
