"""Syllable-based pseudo-names ("Kelvora", "Tamsik", "Orvan") that the model must learn to copy.

Gender is readable from the spelling so that French agreement stays learnable for unseen names:
feminine pseudo-names end in "a", masculine ones never end in a vowel other than "o"/"i".
No pseudo-name starts with h or y, whose elision behaviour is not predictable from spelling.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from .lexicon import Name, starts_with_vowel

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "tr",
    "gr",
    "pl",
    "st",
    "sk",
    "j",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("n", "l", "r", "s", "k", "m", "x", "v")
_MASC_ENDINGS = ("o", "i", "ik", "an", "or", "el", "us", "en", "ix", "ar")


def _syllable(rng: random.Random, first: bool) -> str:
    # About a quarter of the names start with a vowel, to exercise d'/qu' elision.
    onset = "" if first and rng.random() < 0.25 else rng.choice(_ONSETS)
    coda = rng.choice(_CODAS) if rng.random() < 0.3 else ""
    return onset + rng.choice(_VOWELS) + coda


def pseudo_name(rng: random.Random) -> Name:
    feminine = rng.random() < 0.5
    stem = "".join(_syllable(rng, i == 0) for i in range(rng.choice((1, 2, 2))))
    if feminine:
        stem = stem.rstrip("aeiou") + rng.choice(("", "l", "r", "n", "s", "v")) + "a"
    else:
        stem = stem.rstrip("aeiou") + rng.choice(_MASC_ENDINGS)
    text = stem.capitalize()
    return Name(text, feminine, starts_with_vowel(text))


def pseudo_name_pools(seed: int, sizes: Iterable[int], reserved: Iterable[str]) -> list[tuple[Name, ...]]:
    """Disjoint pools drawn from one stream: pool 0 for train/valid, pool 1 for test/held-out.

    Names that collide with a real name or any lexicon word (in either language) are skipped, and
    every name appears in exactly one pool.
    """
    rng = random.Random(f"pseudo-names-{seed}")
    taken = {word.lower() for word in reserved}
    pools: list[tuple[Name, ...]] = []
    for size in sizes:
        pool: list[Name] = []
        while len(pool) < size:
            name = pseudo_name(rng)
            if len(name.text) < 4 or name.text.lower() in taken:
                continue
            taken.add(name.text.lower())
            pool.append(name)
        pools.append(tuple(pool))
    return pools
