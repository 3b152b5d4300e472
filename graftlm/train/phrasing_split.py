"""A validation split of phrasings that training never sees (`--validation-split phrasings`).

A random split of templated or repetitive data holds rows whose wording also occurs in training,
so validation exact match saturates (0.96-1.00 on the zoo's tasks) while a test of new phrasings
reads far lower, and the early stop cannot tell the adapters along a run apart. This split holds
out every row that contains one of a few rare word pairs of the prompt instead: once those rows
are out, no training prompt holds those pairs, as no training prompt holds a new phrasing of the
user's test. Which of the two splits picks the better adapter is measured in
`bench/validation_tracking.py` (bench/results/zoo.md).
"""

from __future__ import annotations

import random
import re

_WORD = re.compile(r"[a-z']+|\d+")
# the share of the rows a word pair may occur in to be held out: rarer pairs are one row's own
# (a name, a typo), commoner ones are the task's frame (the system prompt, a greeting)
RARE_PAIR_SHARE = (0.01, 0.05)
# a pair whose rows would take the split past this multiple of the rows wanted is passed over
OVERSHOOT = 1.25


def word_pairs(text: str) -> set[tuple[str, str]]:
    """Adjacent word pairs, lower-cased, every number as "0" (a new amount is not a new
    phrase)."""
    words = ["0" if w.isdigit() else w for w in _WORD.findall(text.lower())]
    return set(zip(words, words[1:]))


def held_out_phrasings(texts: list[str], rows: int, seed: int) -> list[int]:
    """Indices of about `rows` of `texts` (prompts) that together hold every prompt containing
    one of a few word pairs: pairs found in 1-5% of the prompts, drawn at random (`seed`), each
    taken whole while the split stays under 1.25x `rows`.

    Returns fewer than `rows` indices (or none) where the data has too few such pairs, e.g.
    prompts that share no wording at all; the caller fills up at random.
    """
    holders: dict[tuple[str, str], list[int]] = {}
    for i, text in enumerate(texts):
        for pair in word_pairs(text):
            holders.setdefault(pair, []).append(i)
    low = max(2, round(RARE_PAIR_SHARE[0] * len(texts)))
    high = max(3, round(RARE_PAIR_SHARE[1] * len(texts)))
    candidates = sorted(pair for pair, held in holders.items() if low <= len(held) <= high)
    random.Random(f"unseen:{seed}").shuffle(candidates)
    chosen: set[int] = set()
    for pair in candidates:
        extra = set(holders[pair]) - chosen
        if len(chosen) + len(extra) <= OVERSHOOT * rows:
            chosen |= extra
        if len(chosen) >= rows:
            break
    return sorted(chosen)
