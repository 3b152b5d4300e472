"""Tiny random Stable Diffusion parts built from configs (a few hundred thousand parameters):
a UNet2DConditionModel, a CLIPTextModel, a one-block VAE, and the byte-level CLIP tokenizer of
graftlm.image.small_pipeline (the image demo's base is built by that module)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from graftlm.image.small_pipeline import byte_tokenizer


def unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def pipeline(unet, text_encoder) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet,
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer with one token per byte (and per word-final byte), no merges."""
    return byte_tokenizer(folder, max_length=16)


def pipeline_folder(folder: Path) -> Path:
    """A saved tiny StableDiffusionPipeline (what `graftlm train-image --base` reads)."""
    pipe = pipeline(unet(), text_encoder())
    pipe.tokenizer = tokenizer(folder.parent / "tokenizer_files")
    pipe.register_modules(tokenizer=pipe.tokenizer)
    pipe.save_pretrained(folder)
    return folder
