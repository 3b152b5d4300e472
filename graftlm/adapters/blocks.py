"""`--layers`: which decoder blocks of a model get adapters.

PEFT calls this `layers_to_transform` (a list of block indices); graftlm's training config
also takes it relative to the model, so that one recipe fits models of any depth: "top-half"
adapts the upper half of the blocks. Frozen blocks below the lowest adapted one need no backward
pass at all (no parameter below them trains), so adapting the top half cuts a step's backward
roughly in half (bench/results/zoo.md, "Adapting the upper blocks only").
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from graftlm.errors import GraftError

if TYPE_CHECKING:  # TrainConfig checks a value with this module, and stays free of torch
    from torch import nn

# "top-half", "top-K" (the last K blocks), or indices and ranges: "15-29", "0,2,4-6"
BLOCK_SPEC = re.compile(r"top-half|top-\d+|\d+(-\d+)?(,\d+(-\d+)?)*")
BLOCK_SPEC_HELP = "'top-half', 'top-K' (the last K blocks), or indices such as '15-29' or '0,2,4-6'"


def check_block_spec(spec: str) -> str:
    """Refuse a `--layers` value that is not one of the accepted forms, naming it; returns the
    value without its spaces.

    Raises:
        GraftError: the value, and the forms accepted.
    """
    text = spec.replace(" ", "")
    if not BLOCK_SPEC.fullmatch(text):
        raise GraftError(f"layers: {spec!r} is not a block selection; use {BLOCK_SPEC_HELP}")
    if text == "top-0":
        raise GraftError("layers: 'top-0' selects no block")
    if not text.startswith("top-"):
        for part, low, high in _index_ranges(text):
            if high < low:
                raise GraftError(f"layers: the range {part!r} in {spec!r} runs backwards")
    return text


def _index_ranges(text: str) -> list[tuple[str, int, int]]:
    """("4-6", 4, 6) for each item of an index selection ("0,2,4-6"; "2" is ("2", 2, 2))."""
    ranges = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        ranges.append((part, int(low), int(high or low)))
    return ranges


def block_indices(spec: str | None, blocks: int) -> tuple[int, ...] | None:
    """The block indices `spec` selects in a model of `blocks` decoder blocks (None: all).

    Raises:
        GraftError: an index past the model's last block, or a bad `spec`.
    """
    if spec is None:
        return None
    text = check_block_spec(spec)
    if text == "top-half":
        return tuple(range(blocks // 2, blocks))
    if text.startswith("top-"):
        count = int(text[4:])
        if count > blocks:
            raise GraftError(f"layers: {spec!r} asks for {count} blocks; the model has {blocks}")
        return tuple(range(blocks - count, blocks))
    chosen: set[int] = set()
    for _, low, high in _index_ranges(text):
        chosen.update(range(low, high + 1))
    if max(chosen) >= blocks:
        raise GraftError(
            f"layers: {spec!r} names block {max(chosen)}; the model has {blocks} blocks "
            f"(0-{blocks - 1})"
        )
    return tuple(sorted(chosen))


def block_count(model: nn.Module) -> int:
    """The number of numbered decoder blocks in `model` (the highest block index plus one)."""
    from graftlm.adapters.modules import LAYER_INDEX

    highest = -1
    for name, _ in model.named_modules():
        match = LAYER_INDEX.match(name + ".")
        if match is not None:
            highest = max(highest, int(match.group("idx")))
    if highest < 0:
        raise GraftError(f"layers: {type(model).__name__} has no numbered blocks to choose from")
    return highest + 1
