"""Invented names from syllables: deterministic given a ``random.Random``."""

from __future__ import annotations

import random

__all__ = ["invented_names"]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br",
           "dr", "kr", "tr", "vr", "sh", "gl", "pl", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "nd", "rk", "m"]


def invented_names(n: int, rng: random.Random, exclude: set[str] | None = None,
                   syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """``n`` distinct capitalized invented names, none in ``exclude`` (compared lowercase).

    Names are purely alphabetic, so word-level tokenizers keep each as one token.
    """
    taken = {name.lower() for name in (exclude or set())}
    names: list[str] = []
    while len(names) < n:
        count = rng.randint(*syllables)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(count))
        word += rng.choice(_CODAS)
        if len(word) < 4 or word in taken:
            continue
        taken.add(word)
        names.append(word.capitalize())
    return names
