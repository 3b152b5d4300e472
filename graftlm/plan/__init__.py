"""`graftlm plan`: a fine-tune's memory and time from a model's config.json, before it starts.

`shapes.py` (the model on the meta device, what a method trains), `activations.py` (bytes per
token, measured on a scaled-down copy under graftlm's forward), `memory.py` (every term and the
peak), `timing.py` (FLOPs per token over measured rates), `report.py` (`plan_run`, text, JSON).
This module stays light: the CLI reads `METHODS` without importing torch.
"""

# every --method graftlm trains, planned from its definition even before it lands
METHODS = (
    "lora",
    "qlora",
    "dora",
    "qdora",
    "adalora",
    "ia3",
    "bottleneck",
    "prompt",
    "prefix",
    "full",
)
