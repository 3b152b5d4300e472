"""Target presets for diffusers models, the module names diffusers' training scripts adapt.

Use them as `LoraConfig.targets`::

    graftlm.inject(unet, graftlm.LoraConfig(rank=4, targets=UNET_ATTENTION))
    graftlm.inject(text_encoder, graftlm.LoraConfig(rank=4, targets=TEXT_ENCODER_ATTENTION))
"""

from __future__ import annotations

# the attention projections of every transformer block (diffusers' train_dreambooth_lora.py)
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# ... plus the ResNet convs and the transformer blocks' in/out projections (LoCon-style)
UNET_CONVS = ("conv1", "conv2", "conv_shortcut", "proj_in", "proj_out")
# ... and the feed-forward layers of the transformer blocks
UNET_FF = ("ff.net.0.proj", "ff.net.2")
UNET_ALL = UNET_ATTENTION + UNET_CONVS + UNET_FF
# CLIP's attention projections (diffusers' text-encoder LoRA)
TEXT_ENCODER_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")

PRESETS = {
    "attention": UNET_ATTENTION,
    "attention+conv": UNET_ATTENTION + UNET_CONVS,
    "all": UNET_ALL,
    "text-encoder": TEXT_ENCODER_ATTENTION,
}
