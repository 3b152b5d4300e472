"""AdaLoRA: SVD-shaped LoRA whose rank budget is reallocated by importance."""
