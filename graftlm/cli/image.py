"""`graftlm train-image` and `graftlm generate-image`: LoRA on diffusers Stable Diffusion pipelines.

Flags are built from `ImageTrainConfig`'s fields (their help from its docstring); torch and
diffusers are imported inside the command, so `graftlm --help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

from graftlm.image.config import ImageTrainConfig


def add_train_image(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-image",
        help="DreamBooth-style LoRA on a diffusers pipeline folder (writes pytorch_lora_weights.safetensors)",
    )
    helps = dict(re.findall(r"^\s{8}(\w+): (.+)$", ImageTrainConfig.__doc__ or "", re.M))
    for field in dataclasses.fields(ImageTrainConfig):
        flag = "--" + field.name.replace("_", "-")
        required = field.default is dataclasses.MISSING
        kind = {"int": int, "float": float}.get(str(field.type).split(" |")[0], str)
        if field.type == "bool":
            p.add_argument(flag, dest=field.name, action="store_true", help=helps.get(field.name))
            continue
        p.add_argument(
            flag,
            dest=field.name,
            type=kind,
            required=required,
            default=None if required else field.default,
            help=helps.get(field.name),
        )
    p.set_defaults(func=cmd_train_image)


def cmd_train_image(args: argparse.Namespace) -> int:
    from graftlm.image.train import train_image

    names = [f.name for f in dataclasses.fields(ImageTrainConfig)]
    path = train_image(ImageTrainConfig(**{n: getattr(args, n) for n in names}))
    print(f"LoRA written to {path}")
    return 0


def add_generate_image(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate-image", help="one image from a diffusers pipeline folder, with a LoRA file"
    )
    p.add_argument("--base", required=True, help="a diffusers pipeline folder")
    p.add_argument("--adapter", help="a LoRA file (diffusers or kohya format) or its folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, help="image side in pixels (default: the pipeline's)")
    p.set_defaults(func=cmd_generate_image)


def cmd_generate_image(args: argparse.Namespace) -> int:
    from graftlm.image.generate import generate_image

    path = generate_image(
        args.base,
        args.prompt,
        args.out,
        args.adapter,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        size=args.size,
    )
    print(f"image written to {path}")
    return 0
