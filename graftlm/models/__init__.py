"""Loading a base model: the built-in model, a Hugging Face folder or a GGUF file."""
