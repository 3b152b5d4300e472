"""`graftlm train-image`: LoRA on a diffusers Stable Diffusion pipeline from a folder of images.

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
