"""A small Stable Diffusion pipeline built from configs, with no model hub: random weights in
the shapes of SD's parts, small enough to pretrain on one CPU core in minutes.

    tokenizer     CLIP's BPE with one token per byte (no merges), written to a folder
    text_encoder  CLIPTextModel, `text_hidden` wide
    vae           AutoencoderKL, 4 latent channels, one 2x downsampling per block after the first
    unet          UNet2DConditionModel: cross-attention down/up blocks, like SD's
    scheduler     DDIMScheduler, SD's scaled-linear betas over 1000 steps

`examples/image/make_base.py` pretrains one on synthetic shapes (the image demo's base); the
tests build the same shape with random weights. A real Stable Diffusion folder needs none of
this: `graftlm train-image --base` reads any diffusers pipeline folder.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from graftlm.errors import GraftError


@dataclasses.dataclass(frozen=True)
class SmallPipelineShape:
    """The sizes of a small pipeline.

    Attributes:
        resolution: image side in pixels.
        vae_channels: the VAE's channels per block; each block after the first halves the side.
        unet_channels: the UNet's channels per block (cross-attention in every block but the
            last one down and the first one up).
        text_hidden: the text encoder's width (and the UNet's cross-attention width).
        text_layers: the text encoder's transformer layers.
        max_length: tokens per caption (the tokenizer's model_max_length), bytes + 2.
    """

    resolution: int = 32
    vae_channels: tuple[int, ...] = (32, 64, 64)
    unet_channels: tuple[int, ...] = (64, 128)
    text_hidden: int = 64
    text_layers: int = 2
    max_length: int = 32

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable character table (its BPE works on these characters)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def byte_tokenizer(folder: str | Path, max_length: int = 32) -> CLIPTokenizer:
    """A CLIP tokenizer with one token per byte (and per word-final byte), no merges; its
    vocab.json and merges.txt are written to `folder`. 514 tokens: 2 x 256 bytes, then
    `<|startoftext|>` and `<|endoftext|>`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )


def text_encoder(shape: SmallPipelineShape, vocab_size: int = 514) -> CLIPTextModel:
    """A random CLIPTextModel over the byte tokenizer's vocabulary."""
    config = CLIPTextConfig(
        hidden_size=shape.text_hidden,
        intermediate_size=4 * shape.text_hidden,
        num_attention_heads=max(1, shape.text_hidden // 16),
        num_hidden_layers=shape.text_layers,
        vocab_size=vocab_size,
        max_position_embeddings=shape.max_length,
        projection_dim=shape.text_hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config).eval()


def _diffusers():
    # diffusers is graftlm's optional [image] extra
    try:
        import diffusers
    except ImportError:
        raise GraftError("a small pipeline needs diffusers: pip install 'graftlm[image]'") from None
    return diffusers


def vae(shape: SmallPipelineShape):
    """A random AutoencoderKL: 3 -> 4 latent channels, `latent_size` per side."""
    diffusers = _diffusers()
    blocks = len(shape.vae_channels)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=shape.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1,
        norm_num_groups=min(32, shape.vae_channels[0] // 2),
        sample_size=shape.resolution,
    ).eval()


def unet(shape: SmallPipelineShape):
    """A random UNet2DConditionModel on the VAE's latents, cross-attending to the text encoder."""
    diffusers = _diffusers()
    blocks = len(shape.unet_channels)
    return diffusers.UNet2DConditionModel(
        sample_size=shape.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=shape.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (blocks - 1),
        cross_attention_dim=shape.text_hidden,
        attention_head_dim=16,
        norm_num_groups=min(32, shape.unet_channels[0] // 2),
    ).eval()


def scheduler():
    """DDIM over SD's noise schedule (scaled-linear betas 0.00085 -> 0.012, 1000 steps)."""
    return _diffusers().DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_pipeline(shape: SmallPipelineShape | None = None, seed: int = 0):
    """A StableDiffusionPipeline of random parts in `shape` (default: the image demo's).

    `pipe.save_pretrained(folder)` makes a folder that `graftlm train-image --base` and diffusers'
    `StableDiffusionPipeline.from_pretrained` both read.
    """
    shape = shape or SmallPipelineShape()
    diffusers = _diffusers()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = byte_tokenizer(folder, shape.max_length)
    return diffusers.StableDiffusionPipeline(
        vae=vae(shape),
        text_encoder=text_encoder(shape, len(tokenizer)),
        tokenizer=tokenizer,
        unet=unet(shape),
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
