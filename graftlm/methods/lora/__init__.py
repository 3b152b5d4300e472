"""methods/lora."""
