"""Where DARE's random masks come from in PEFT's `add_weighted_adapter`, replayed.

PEFT draws every mask from the global torch generator (`torch.bernoulli`), module by module in
the base model's order (`model.named_modules()`), after `inject_adapter` has initialised the new
adapter on every module, which draws numbers too: `nn.Linear(in, r)` and `nn.Linear(r, out)`
initialise themselves, then `reset_lora_parameters` draws A again (kaiming-uniform, or normal
for "gaussian"); an embedding draws `randn` for A and B, then normal for B. Drawing the same
numbers in the same order here puts the generator where PEFT's is when its masks are drawn, so
`torch.manual_seed(S)` before PEFT's call and `seed=S` in graftlm give the same masks.

The order needs the base's module list: built on the meta device from its config (no weight is
read), or taken from a loaded model. Without a base, the masks are drawn in name order: valid
random masks, reproducible for a seed, but not PEFT's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from graftlm.errors import GraftError

log = logging.getLogger(__name__)

REPLAYED_INITS = (True, False, "gaussian", "eva")
"""`init_lora_weights` values whose draws are replayed (others draw from the base's weights)."""


def module_order(modules: set[str], base, dare: bool) -> list[str]:
    """The adapted `modules` in the order their masks are drawn.

    Args:
        modules: the module names the adapters adapt.
        base: a loaded model, or the name or path of the base (a Hugging Face folder, a .gguf
            file, the built-in name); None when unknown.
        dare: whether random masks are drawn at all (else the order changes no number, and
            the base is not looked at).

    Returns:
        The modules in the base's order where it is known, else by name (layer numbers
        compared as numbers), with a warning when DARE needs the base's.

    Raises:
        GraftError: the base lacks a module the adapters adapt.
    """
    by_name = sorted(modules, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    if not dare:
        return by_name
    names = base_module_names(base)
    if names is None:
        log.warning(
            "warning: the base model is unknown (pass --base), so DARE's masks are drawn in "
            "module name order: valid random masks, but not the ones PEFT draws with this seed"
        )
        return by_name
    position = {n: i for i, n in enumerate(names)}
    missing = sorted(modules - position.keys())
    if missing:
        raise GraftError(
            f"the base model has no module {missing[0]!r} that the adapters adapt: they were "
            "trained on another base"
        )
    return sorted(modules, key=position.__getitem__)


def base_module_names(base) -> list[str] | None:
    """The module names of `base` in model order (None when it names no local model)."""
    if base is None:
        return None
    if isinstance(base, nn.Module):
        return [name for name, _ in base.named_modules()]
    # transformers and the GGUF cache are heavy, and only DARE needs them: imported here
    from transformers import AutoConfig, AutoModelForCausalLM

    from graftlm.models.gguf_cache import BUILTIN_NAME, builtin_gguf_path, ensure_converted

    text = os.fspath(base)
    path = Path(text).expanduser()
    if text.strip().lower() in (BUILTIN_NAME, "huggingfacetb/smollm2-135m-instruct"):
        folder = ensure_converted(builtin_gguf_path(), None)
    elif path.is_dir() and (path / "config.json").is_file():
        folder = path
    elif path.is_file() and path.suffix.lower() == ".gguf":
        folder = ensure_converted(path.resolve(), None)
    else:
        return None
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):  # the module tree only: no memory, no random init drawn
        skeleton = AutoModelForCausalLM.from_config(config)
    return [name for name, _ in skeleton.named_modules()]


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed the global generator for the block and restore the caller's state after; None:
    draw from the current state (as PEFT does)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def replay_init_draws(layers: list[tuple[int, int, bool]], rank: int, init) -> None:
    """Draw what PEFT's `inject_adapter` draws for a new adapter of rank `rank` on `layers`
    ((in, out, is_embedding) in module order), with the first adapter's `init_lora_weights`."""
    if init not in REPLAYED_INITS:
        log.warning(
            "warning: init_lora_weights=%r: its random draws are not replayed, so DARE's masks "
            "differ from PEFT's for the same seed",
            init,
        )
    for in_f, out_f, is_embedding in layers:
        if is_embedding:
            torch.randn((rank, in_f))
            new_b = torch.randn((out_f, rank))
            if init:
                nn.init.normal_(new_b)
            continue
        new_a = torch.empty(rank, in_f)
        nn.init.kaiming_uniform_(new_a, a=math.sqrt(5))  # nn.Linear(in, r)'s own init
        nn.init.kaiming_uniform_(torch.empty(out_f, rank), a=math.sqrt(5))  # nn.Linear(r, out)
        if init is True:
            nn.init.kaiming_uniform_(new_a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(new_a, std=1 / rank)
