"""methods/virtual_tokens."""
