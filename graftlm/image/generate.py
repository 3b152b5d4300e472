"""`graftlm generate-image`: a diffusers pipeline, graftlm's LoRA loaded into its parts, one image.

The LoRA file (diffusers' or kohya's format, `lora_files.py`) is loaded into the pipeline's UNet
and text encoder by graftlm, so what graftlm trained or read is exactly what samples; the
sampling itself is diffusers' pipeline call.
"""

from __future__ import annotations

from pathlib import Path

import torch

from graftlm.image.lora_files import load_lora_weights, read_lora_file
from graftlm.image.train import load_pipeline


def generate_image(
    base: str | Path,
    prompt: str,
    out: str | Path,
    adapter: str | Path | None = None,
    *,
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    size: int | None = None,
) -> Path:
    """Sample one image for `prompt` and write it as PNG to `out`.

    Args:
        base: a diffusers pipeline folder.
        prompt: the text prompt.
        out: the PNG file to write.
        adapter: a LoRA file, or a folder holding `pytorch_lora_weights.safetensors`; None: the
            base alone.
        steps: denoising steps.
        guidance: classifier-free guidance scale.
        seed: seeds the initial noise.
        size: image side in pixels (default: the pipeline's).

    Returns:
        `out`.

    Raises:
        GraftError: a bad pipeline folder or LoRA file (or one for parts the pipeline lacks).
    """
    pipe = load_pipeline(base)
    if adapter is not None:
        parts = {p: getattr(pipe, p) for p in read_lora_file(adapter).parts}
        load_lora_weights(adapter, parts)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        image = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            height=size,
            width=size,
        ).images[0]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
