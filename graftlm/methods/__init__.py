"""Parameter-efficient methods: one module per method (LoRA, NF4 base for QLoRA, ...)."""
