"""methods/ia3."""
