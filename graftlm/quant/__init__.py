"""NF4 4-bit base weights (the QLoRA base): the format and the linear layer."""
