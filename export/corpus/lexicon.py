"""Typed view of the bilingual lexicon kept as TSV files in ``export/corpus/lexicon/``.

The data files are the single source of truth for word forms: every French form (gender, plural,
the six present-tense forms, the four adjective forms and the liaison form) is spelled out there
rather than derived, so that irregularities are visible and reviewable as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources

NOUN_CLASSES = ("person", "animal", "food", "drink", "text", "thing", "body", "place", "nature", "time")
# "all" in a verb's object column means every concrete class; time nouns only appear with être.
ALL_CONCRETE = frozenset(NOUN_CLASSES) - {"time"}
ANIMATE = frozenset({"person", "animal"})
INANIMATE = ALL_CONCRETE - ANIMATE
FRAMES = ("cop", "tr", "intr", "ditr", "io", "goal", "source", "loc")


@dataclass(frozen=True, slots=True)
class Noun:
    en: str
    en_pl: str
    fr: str
    fr_pl: str
    feminine: bool
    vowel: bool  # French form elides a preceding le/la/de/que and takes cet/mon (h-muet included)
    cls: str
    flags: frozenset[str]

    @property
    def mass(self) -> bool:
        return "mass" in self.flags

    @property
    def irregular_plural(self) -> bool:
        return not self.mass and self.fr_pl != self.fr + "s"


@dataclass(frozen=True, slots=True)
class Adjective:
    en: str
    forms: tuple[str, str, str, str]  # masc sg, fem sg, masc pl, fem pl
    liaison: str | None  # masculine singular before a vowel (bel, nouvel, vieil)
    prenominal: bool
    applies: frozenset[str]  # noun classes it can modify (light semantics)
    vowel: bool

    def form(self, feminine: bool, plural: bool) -> str:
        return self.forms[(2 if plural else 0) + (1 if feminine else 0)]

    @property
    def epicene_sg(self) -> bool:
        return self.forms[0] == self.forms[1]

    @property
    def epicene_pl(self) -> bool:
        return self.forms[2] == self.forms[3]

    def fits(self, noun: Noun) -> bool:
        return noun.cls in self.applies


@dataclass(frozen=True, slots=True)
class Verb:
    en: str  # lemma key, e.g. "look at"
    en_3sg: str  # "looks at"
    fr_inf: str
    forms: tuple[str, str, str, str, str, str]  # je tu il nous vous ils
    vclass: str  # er, er_spelling, ir, re, irregular
    frames: frozenset[str]
    subject: frozenset[str]  # noun classes and +flags
    obj: frozenset[str]
    indirect: frozenset[str]
    io_prep: str  # English preposition before the indirect object ("" for answer/obey/phone)
    adjuncts: frozenset[str]  # "in", "with": optional PP for the intransitive frame
    generic: bool  # love/like/prefer/hate: bare plural/mass object takes the definite article

    @property
    def en_base(self) -> str:
        return self.en.split(" ")[0]

    @property
    def particle(self) -> str:
        parts = self.en.split(" ", 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def en_3sg_base(self) -> str:
        return self.en_3sg.split(" ")[0]


@dataclass(frozen=True, slots=True)
class Name:
    text: str
    feminine: bool
    vowel: bool


@dataclass(frozen=True)
class Lexicon:
    nouns: tuple[Noun, ...]
    adjectives: tuple[Adjective, ...]
    verbs: tuple[Verb, ...]
    names: tuple[Name, ...]
    cities: tuple[Name, ...]
    _nouns: dict[str, Noun] = field(init=False, repr=False, compare=False)
    _adjectives: dict[str, Adjective] = field(init=False, repr=False, compare=False)
    _verbs: dict[str, Verb] = field(init=False, repr=False, compare=False)
    _names: dict[str, Name] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Lookup tables for tests and hand-written sentence specs; sampling uses the tuples.
        object.__setattr__(self, "_nouns", {n.en: n for n in self.nouns})
        object.__setattr__(self, "_adjectives", {a.en: a for a in self.adjectives})
        object.__setattr__(self, "_verbs", {v.en: v for v in self.verbs})
        object.__setattr__(self, "_names", {n.text: n for n in self.names + self.cities})

    def noun(self, en: str) -> Noun:
        return self._nouns[en]

    def adjective(self, en: str) -> Adjective:
        return self._adjectives[en]

    def verb(self, en: str) -> Verb:
        return self._verbs[en]

    def name(self, text: str) -> Name:
        return self._names[text]

    def lemma_counts(self) -> dict[str, int]:
        return {
            "nouns": len(self.nouns),
            "adjectives": len(self.adjectives),
            "verbs": len(self.verbs),
            "pronouns": len(PRONOUNS),
            "determiners": len(DETERMINERS),
            "prepositions": len(PREPOSITIONS),
        }


# Closed classes live in code because their behaviour (not just their forms) is grammar.
PRONOUNS = ("I", "you", "he", "she", "we", "they")
DETERMINERS = ("the", "a", "my", "your", "his", "her", "our", "their", "this", "these")
PREPOSITIONS = ("in", "with", "to", "from", "of")

VOWELS = frozenset("aeiouyàâäéèêëîïôöùûüœæAEIOUYÀÂÄÉÈÊËÎÏÔÖÙÛÜŒÆ")


def starts_with_vowel(word: str) -> bool:
    """Default elision test for words not flagged in the data (names, function words, verbs).

    'h' counts as a consonant: the lexicon lists h-muet nouns explicitly and no name or verb
    starts with h.
    """
    return bool(word) and word[0] in VOWELS


def _rows(filename: str) -> list[list[str]]:
    text = resources.files("export.corpus").joinpath("lexicon").joinpath(filename).read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]


def _set(field: str) -> frozenset[str]:
    return frozenset() if field == "-" else frozenset(field.split(","))


def _expand_classes(field: str) -> frozenset[str]:
    shorthands = {
        "all": ALL_CONCRETE,
        "any": frozenset(NOUN_CLASSES),
        "animate": ANIMATE,
        "inanimate": INANIMATE,
    }
    items: set[str] = set()
    for item in _set(field):
        items |= shorthands.get(item, {item})
    return frozenset(items)


def _noun(row: list[str]) -> Noun:
    en, en_pl, fr, fr_pl, gender, initial, cls, flags = row
    assert gender in "mf" and initial in "vc" and cls in NOUN_CLASSES, row
    return Noun(en, en_pl, fr, fr_pl, gender == "f", initial == "v", cls, _set(flags))


def _adjective(row: list[str]) -> Adjective:
    en, msg, fsg, mpl, fpl, liaison, position, applies, initial = row
    applies_to = _expand_classes(applies)
    assert position in ("pre", "post") and applies_to <= set(NOUN_CLASSES), row
    liaison_form = None if liaison == "-" else liaison
    return Adjective(en, (msg, fsg, mpl, fpl), liaison_form, position == "pre", applies_to, initial == "v")


def _verb(row: list[str]) -> Verb:
    en, en_3sg, inf, je, tu, il, nous, vous, ils, vclass, frames, subj, obj, ind, io_prep, adj, gen = row
    frame_set = _set(frames)
    assert frame_set <= set(FRAMES), row
    return Verb(
        en,
        en_3sg,
        inf,
        (je, tu, il, nous, vous, ils),
        vclass,
        frame_set,
        _expand_classes(subj),
        _expand_classes(obj),
        _expand_classes(ind),
        "" if io_prep == "-" else io_prep,
        _set(adj),
        gen == "y",
    )


@cache
def load_lexicon() -> Lexicon:
    """Load (once per process) the lexicon shipped as package data."""
    names = tuple(Name(r[0], r[1] == "f", starts_with_vowel(r[0])) for r in _rows("names.tsv"))
    # A city's gender never matters: it is only used after à/de, which take no article.
    cities = tuple(Name(r[0], False, starts_with_vowel(r[0])) for r in _rows("cities.tsv"))
    return Lexicon(
        nouns=tuple(_noun(r) for r in _rows("nouns.tsv")),
        adjectives=tuple(_adjective(r) for r in _rows("adjectives.tsv")),
        verbs=tuple(_verb(r) for r in _rows("verbs.tsv")),
        names=names,
        cities=cities,
    )
