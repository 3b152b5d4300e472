"""The names of `graftlm combine`'s rules (PEFT's `combination_type` values), in a module that
imports nothing heavy, so `graftlm combine --help` and its argument check need no torch."""

HOWS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
"""The combination rules, PEFT's `combination_type` values."""
