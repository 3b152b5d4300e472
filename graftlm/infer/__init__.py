"""Running a base model with adapters: loading for inference, generation, evaluation."""
