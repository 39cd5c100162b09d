"""Lexical combinations and structural tags read off a sentence structure.

Combination keys use English lemmas, e.g. ``an:red|car`` (adjective modifying or predicated of a
noun) and ``svo:dog|see|cat`` (common-noun subject, transitive verb, common-noun object).
"""

from __future__ import annotations

from collections.abc import Iterator

from .structures import (
    NP,
    AdjectivePredicate,
    Clause,
    CoordNP,
    LocativePredicate,
    NounPhrase,
    Sentence,
    VerbPredicate,
    head_nouns,
    is_feminine,
)


def an_key(adjective: str, noun: str) -> str:
    return f"an:{adjective}|{noun}"


def svo_key(subject: str, verb: str, obj: str) -> str:
    return f"svo:{subject}|{verb}|{obj}"


def _noun_phrases(np: NP | None) -> Iterator[NounPhrase]:
    if isinstance(np, NounPhrase):
        yield np
        yield from _noun_phrases(np.of)
    elif isinstance(np, CoordNP):
        for item in np.items:
            yield from _noun_phrases(item)


def _clause_nps(clause: Clause) -> Iterator[NP]:
    yield clause.subject
    pred = clause.predicate
    if isinstance(pred, LocativePredicate):
        yield pred.pp.np
    elif isinstance(pred, VerbPredicate):
        for np in (pred.obj, pred.indirect, pred.pp.np if pred.pp else None):
            if np is not None:
                yield np


def sentence_combos(sentence: Sentence) -> frozenset[str]:
    keys: set[str] = set()
    for clause in sentence.clauses:
        for np in _clause_nps(clause):
            keys.update(an_key(p.adjective.en, p.noun.en) for p in _noun_phrases(np) if p.adjective)
        pred = clause.predicate
        subjects = head_nouns(clause.subject)
        if isinstance(pred, AdjectivePredicate):
            keys.update(an_key(pred.adjective.en, n.en) for n in subjects)
        elif isinstance(pred, VerbPredicate) and pred.obj is not None:
            objects = head_nouns(pred.obj)
            keys.update(svo_key(s.en, pred.verb.en, o.en) for s in subjects for o in objects)
    return frozenset(keys)


def structure_tags(sentence: Sentence) -> frozenset[str]:
    """Tags about sentence shape; the French realiser adds the tags about word forms."""
    tags: set[str] = set()
    if len(sentence.clauses) > 1:
        tags |= {"coordination", "coordination_clause"}
    for clause in sentence.clauses:
        pred = clause.predicate
        if isinstance(clause.subject, CoordNP):
            tags |= {"coordination", "coordination_subject"}
            if isinstance(pred, AdjectivePredicate):
                genders = {is_feminine(item) for item in clause.subject.items}
                tags.add("mixed_gender_agreement" if len(genders) == 2 else "coordination_agreement")
        if isinstance(pred, VerbPredicate):
            if isinstance(pred.obj, CoordNP):
                tags |= {"coordination", "coordination_object"}
            tags.add("frame_" + pred.frame)
            if pred.verb.particle and pred.frame == "tr":
                tags.add("phrasal_verb")
        elif isinstance(pred, AdjectivePredicate):
            tags.add("frame_cop_adj")
        else:
            tags.add("frame_cop_loc")
    return frozenset(tags)
