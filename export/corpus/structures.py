"""Language-neutral sentence structures: both the English and the French sentence are realised
from one of these, so a pair can never drift apart the way translated strings could.

Lemmas are referenced through the lexicon dataclasses; every choice that affects the surface
(number, determiner, negation, ...) is explicit here, so realisation is a pure function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .lexicon import Adjective, Name, Noun, Verb

# def: the; indef: a / (plural) bare "some" reading -> des; bare: no English determiner (bare plural
# or mass noun; French chooses des/partitive or, after love/like, the definite article);
# dem: this/these; poss: my/your/...; num: a cardinal number.
Det = Literal["def", "indef", "bare", "dem", "poss", "num"]
Possessor = Literal["my", "your", "his", "her", "our", "their"]
Person = Literal["I", "you", "he", "she", "we", "they"]
NameKind = Literal["person", "pseudo", "city"]


@dataclass(frozen=True, slots=True)
class NounPhrase:
    noun: Noun
    det: Det
    plural: bool = False
    adjective: Adjective | None = None
    possessor: Possessor | None = None
    count: int | None = None
    of: NounPhrase | NameNP | None = None  # "the door of the house"


@dataclass(frozen=True, slots=True)
class NameNP:
    name: Name
    kind: NameKind


@dataclass(frozen=True, slots=True)
class PronounNP:
    person: Person


@dataclass(frozen=True, slots=True)
class CoordNP:
    items: tuple[NounPhrase | NameNP, ...]  # joined with "and"; never pronouns


NP = NounPhrase | NameNP | PronounNP | CoordNP


@dataclass(frozen=True, slots=True)
class PP:
    prep: Literal["in", "with", "to", "from"]
    np: NP


@dataclass(frozen=True, slots=True)
class VerbPredicate:
    verb: Verb
    frame: str
    obj: NP | None = None  # direct object (tr, ditr)
    indirect: NP | None = None  # à-object (ditr: give X to Y; io: speak to Y / answer Y)
    pp: PP | None = None  # goal/source/loc complement or intransitive adjunct


@dataclass(frozen=True, slots=True)
class AdjectivePredicate:
    adjective: Adjective  # "be" + adjective


@dataclass(frozen=True, slots=True)
class LocativePredicate:
    pp: PP  # "be" + in/with PP


Predicate = VerbPredicate | AdjectivePredicate | LocativePredicate


@dataclass(frozen=True, slots=True)
class Clause:
    subject: NP
    predicate: Predicate
    negated: bool = False
    question: bool = False


@dataclass(frozen=True, slots=True)
class Sentence:
    clauses: tuple[Clause, ...]  # more than one: coordinated with "and" (declaratives only)


def person_index(subject: NP) -> int:
    """Index into the six French verb forms (je tu il nous vous ils); "you" is always vous."""
    if isinstance(subject, PronounNP):
        return {"I": 0, "you": 4, "he": 2, "she": 2, "we": 3, "they": 5}[subject.person]
    if isinstance(subject, CoordNP):
        return 5
    if isinstance(subject, NounPhrase) and subject.plural:
        return 5
    return 2


def head_nouns(np: NP) -> tuple[Noun, ...]:
    """Common-noun heads of a phrase (coordination expanded); names and pronouns have none."""
    if isinstance(np, NounPhrase):
        return (np.noun,)
    if isinstance(np, CoordNP):
        return tuple(item.noun for item in np.items if isinstance(item, NounPhrase))
    return ()


def is_feminine(np: NP) -> bool:
    """Gender for agreement: a coordination is feminine only if every member is."""
    if isinstance(np, NounPhrase):
        return np.noun.feminine
    if isinstance(np, NameNP):
        return np.name.feminine
    if isinstance(np, CoordNP):
        return all(is_feminine(item) for item in np.items)
    return np.person == "she"


def is_plural(np: NP) -> bool:
    if isinstance(np, NounPhrase):
        return np.plural
    if isinstance(np, CoordNP):
        return True
    if isinstance(np, PronounNP):
        return np.person in ("we", "they")
    return False
