"""Held-out lexical combinations: chosen from the seed, banned from train/valid/test, and the only
thing the held-out split is built around (each of its sentences contains at least one of them).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from .combos import an_key, svo_key
from .grammar import Grammar, finalise_clause
from .lexicon import Adjective, Lexicon, Noun, Verb
from .structures import AdjectivePredicate, Clause, Sentence


@dataclass(frozen=True)
class HeldoutCombos:
    adjective_noun: tuple[tuple[str, str], ...]
    subject_verb_object: tuple[tuple[str, str, str], ...]

    def keys(self) -> frozenset[str]:
        return frozenset(
            [an_key(a, n) for a, n in self.adjective_noun]
            + [svo_key(s, v, o) for s, v, o in self.subject_verb_object]
        )


def choose_heldout(grammar: Grammar, seed: int, n_an: int, n_svo: int, avoid: Iterable[str]) -> HeldoutCombos:
    """Pick combinations deterministically; ``avoid`` holds keys that must stay trainable (anchors)."""
    rng = random.Random(f"heldout-combos-{seed}")
    lex, banned = grammar.lex, set(avoid)
    candidates = [
        (a.en, n.en) for n in lex.nouns for a in grammar.adjectives_for(n) if an_key(a.en, n.en) not in banned
    ]
    adjective_noun = sorted(rng.sample(candidates, min(n_an, len(candidates))))
    transitive = grammar.verbs_by_frame["tr"]
    triples: set[tuple[str, str, str]] = set()
    while len(triples) < n_svo:
        verb = transitive[rng.randrange(len(transitive))]
        subjects, objects = grammar.nouns(verb.subject), grammar.nouns(verb.obj)
        if not subjects or not objects:
            continue
        triple = (subjects[rng.randrange(len(subjects))].en, verb.en, objects[rng.randrange(len(objects))].en)
        if svo_key(*triple) not in banned:
            triples.add(triple)
    return HeldoutCombos(tuple(adjective_noun), tuple(sorted(triples)))


def _mode(grammar: Grammar, clause: Clause) -> Clause:
    mode = grammar.weighted((("plain", 65), ("neg", 20), ("question", 15)))
    return finalise_clause(Clause(clause.subject, clause.predicate, mode == "neg", mode == "question"))


def adjective_noun_sentence(grammar: Grammar, adjective: Adjective, noun: Noun) -> Sentence:
    """A sentence where ``adjective`` modifies (or is predicated of) ``noun``."""
    verbs = [v for v in grammar.verbs_by_frame["tr"] if noun in grammar.nouns(v.obj)]
    mode = grammar.choice(("predicative", "object", "object", "subject"))
    if mode == "object" and verbs:
        verb = grammar.choice(verbs)
        obj = grammar.noun_phrase(noun, "obj", adjective=adjective)
        clause = Clause(grammar.subject(verb.subject), grammar.verb_predicate(verb, "tr", obj))
    elif mode == "subject" and noun.cls in ("person", "animal", "thing", "text", "food"):
        subject = grammar.noun_phrase(noun, "subj", adjective=adjective)
        _, pred = grammar.locative_clause()
        clause = Clause(subject, pred)
    else:
        subject = grammar.noun_phrase(noun, "subj", adj_p=0.0)
        clause = Clause(subject, AdjectivePredicate(adjective))
    return Sentence((_mode(grammar, clause),))


def svo_sentence(grammar: Grammar, subject: Noun, verb: Verb, obj: Noun) -> Sentence:
    pred = grammar.verb_predicate(verb, "tr", grammar.noun_phrase(obj, "obj"))
    return Sentence((_mode(grammar, Clause(grammar.noun_phrase(subject, "subj"), pred)),))


def heldout_sentence(grammar: Grammar, lexicon: Lexicon, combos: HeldoutCombos, index: int) -> Sentence:
    """The index-th held-out sentence: combinations are used round-robin so each gets its share."""
    total = len(combos.adjective_noun) + len(combos.subject_verb_object)
    k = index % total
    if k < len(combos.adjective_noun):
        adj, noun = combos.adjective_noun[k]
        return adjective_noun_sentence(grammar, lexicon.adjective(adj), lexicon.noun(noun))
    s, v, o = combos.subject_verb_object[k - len(combos.adjective_noun)]
    return svo_sentence(grammar, lexicon.noun(s), lexicon.verb(v), lexicon.noun(o))
