"""LoRA and QLoRA: layers, injection and switching, per-row adapters, PEFT folders."""
