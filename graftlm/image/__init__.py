"""LoRA for image models: diffusers UNets and text encoders, and the LoRA files image users share.

`presets.py` names the layers diffusers users adapt; `lora_files.py` writes the one
`pytorch_lora_weights.safetensors` that `StableDiffusionPipeline.load_lora_weights` reads and
reads it back, along with kohya / A1111 files. The layers themselves are LoRA's
(`methods/lora/`: linear and conv layers), injected with `graftlm.inject`.
"""
