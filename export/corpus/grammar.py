"""Random sentence structures drawn from the lexicon with a seeded ``random.Random``.

Every choice goes through ``self.rng`` and every candidate list is a tuple in lexicon-file order,
so a seed fully determines the output in any process. Semantic classes are light: verbs say which
noun classes (and flags such as +open) they accept as subject and objects.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from .lexicon import Adjective, Lexicon, Name, Noun, Verb
from .structures import (
    NP,
    PP,
    AdjectivePredicate,
    Clause,
    CoordNP,
    Det,
    LocativePredicate,
    NameNP,
    NounPhrase,
    Possessor,
    Predicate,
    PronounNP,
    Sentence,
    VerbPredicate,
)

T = TypeVar("T")
POSSESSORS: tuple[Possessor, ...] = ("my", "your", "his", "her", "our", "their")
# Weights of clause shapes; regularity matters more than variety for a small model.
SHAPES = (("tr", 40), ("intr", 10), ("cop_adj", 12), ("cop_loc", 8), ("ditr", 8), ("io", 6), ("place", 9))
OF_HEADS = frozenset({"person", "animal", "thing", "text", "place", "body"})
OF_COMPLEMENTS = frozenset({"person", "animal", "place"})


class Grammar:
    def __init__(self, lexicon: Lexicon, pseudo_names: Sequence[Name], rng: random.Random) -> None:
        self.lex = lexicon
        self.pseudo = tuple(pseudo_names)
        self.rng = rng
        # Inside coordinated clauses phrases are kept plain so sentences stay short.
        self.simple = False
        self._spec_cache: dict[frozenset[str], tuple[Noun, ...]] = {}
        self._adj_cache: dict[str, tuple[Adjective, ...]] = {}
        self.verbs_by_frame = {
            frame: tuple(v for v in lexicon.verbs if frame in v.frames)
            for frame in ("tr", "intr", "ditr", "io", "goal", "source", "loc")
        }

    # -- small helpers ------------------------------------------------------------------------
    def choice(self, items: Sequence[T]) -> T:
        return items[int(self.rng.random() * len(items))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def weighted(self, options: Sequence[tuple[T, int]]) -> T:
        total = sum(w for _, w in options)
        r = self.rng.random() * total
        for item, w in options:
            r -= w
            if r < 0:
                return item
        return options[-1][0]

    def nouns(self, spec: frozenset[str]) -> tuple[Noun, ...]:
        """Nouns whose class is in spec or that carry one of spec's +flags."""
        cached = self._spec_cache.get(spec)
        if cached is None:
            flags = {s[1:] for s in spec if s.startswith("+")}
            cached = tuple(n for n in self.lex.nouns if n.cls in spec or n.flags & flags)
            self._spec_cache[spec] = cached
        return cached

    def adjectives_for(self, noun: Noun) -> tuple[Adjective, ...]:
        cached = self._adj_cache.get(noun.en)
        if cached is None:
            cached = tuple(a for a in self.lex.adjectives if a.fits(noun))
            self._adj_cache[noun.en] = cached
        return cached

    def name(self, pseudo_share: float = 0.5) -> NameNP:
        if self.pseudo and self.chance(pseudo_share):
            return NameNP(self.choice(self.pseudo), "pseudo")
        return NameNP(self.choice(self.lex.names), "person")

    def city(self) -> NameNP:
        return NameNP(self.choice(self.lex.cities), "city")

    # -- noun phrases -------------------------------------------------------------------------
    def noun_phrase(
        self, noun: Noun, role: str, adjective: Adjective | None = None, adj_p: float = 0.3
    ) -> NounPhrase:
        """role: subj, obj (bare plurals/mass allowed), pp (after a preposition), of."""
        det = self._det(noun, role)
        plural = self._plural(noun, det, role)
        count = self._count() if det == "num" else None
        if count == 1:
            plural = False
        if adjective is None and role != "of" and self.chance(adj_p / 3 if self.simple else adj_p):
            adjective = self.choice(self.adjectives_for(noun))
        of = None
        # "of" complements only after the/a: "his aunts of the prince" is not natural English.
        if (
            role in ("subj", "obj")
            and det in ("def", "indef")
            and noun.cls in OF_HEADS
            and not noun.mass
            and not self.simple
            and self.chance(0.1)
        ):
            of = self._of_complement(noun)
        possessor = self.choice(POSSESSORS) if det == "poss" else None
        return NounPhrase(noun, det, plural, adjective, possessor, count, of)

    def _det(self, noun: Noun, role: str) -> Det:
        if noun.mass:
            options: list[tuple[Det, int]] = [("def", 35), ("poss", 10), ("dem", 10)]
            return self.weighted(options + ([("bare", 45)] if role == "obj" else []))
        if role == "of":
            return self.weighted([("def", 60), ("poss", 25), ("dem", 15)])
        if role == "pp":
            return self.weighted([("def", 50), ("indef", 15), ("poss", 20), ("dem", 12), ("num", 3)])
        options = [("def", 34), ("indef", 22), ("poss", 14), ("dem", 12), ("num", 9)]
        return self.weighted(options + ([("bare", 18)] if role == "obj" else []))

    def _plural(self, noun: Noun, det: Det, role: str) -> bool:
        if noun.mass or det == "indef":
            return False
        if det in ("bare", "num"):
            return True
        return self.chance(0.15 if role == "pp" else 0.35)

    def _count(self) -> int:
        return self.rng.randint(1, 100) if self.chance(0.5) else self.rng.randint(1, 10)

    def _of_complement(self, head: Noun) -> NounPhrase | NameNP:
        r = self.rng.random()
        if r < 0.25:
            return self.name()
        if r < 0.35 and head.cls == "place":
            return self.city()
        noun = self.choice(self.nouns(OF_COMPLEMENTS))
        return self.noun_phrase(noun, "of")

    def participant(self, spec: frozenset[str], role: str, name_p: float = 0.15) -> NP:
        """A noun phrase (or a name when persons fit, or a city when spec allows) for a slot."""
        if "city" in spec and self.chance(0.3):
            return self.city()
        if "person" in spec and self.chance(name_p):
            return self.name()
        return self.noun_phrase(self.choice(self.nouns(spec)), role)

    def subject(self, spec: frozenset[str], pronouns: Sequence[str] | None = None) -> NP:
        if "person" in spec:
            r = self.rng.random()
            if r < 0.3:
                return PronounNP(self.choice(pronouns or ("I", "you", "he", "she", "we", "they")))  # type: ignore[arg-type]
            if r < 0.45:
                return self.name()
        if not self.simple and self.chance(0.07):
            return self.coordination(spec, "subj")
        return self.noun_phrase(self.choice(self.nouns(spec)), "subj")

    def coordination(self, spec: frozenset[str], role: str) -> CoordNP:
        items: list[NounPhrase | NameNP] = []
        while len(items) < 2:
            item = self.participant(spec - {"city"}, role, name_p=0.2)
            if isinstance(item, NounPhrase | NameNP) and item not in items:
                items.append(item)
        return CoordNP(tuple(items))

    # -- predicates ---------------------------------------------------------------------------
    def predicate(self, shape: str) -> tuple[NP, Predicate]:
        if shape == "cop_adj":
            return self.adjective_clause()
        if shape == "cop_loc":
            return self.locative_clause()
        frame = self.choice(("goal", "source", "loc")) if shape == "place" else shape
        verb = self.choice(self.verbs_by_frame[frame])
        return self.subject(verb.subject), self.verb_predicate(verb, frame)

    def verb_predicate(self, verb: Verb, frame: str, obj: NP | None = None) -> VerbPredicate:
        if frame in ("tr", "ditr") and obj is None:
            obj = self.direct_object(verb)
        indirect = self.participant(verb.indirect, "pp", 0.2) if frame in ("ditr", "io") else None
        pp = self._place_pp(frame) if frame in ("goal", "source", "loc") else None
        if frame == "intr" and verb.adjuncts and self.chance(0.5):
            pp = self.adjunct(self.choice(sorted(verb.adjuncts)))
        return VerbPredicate(verb, frame, obj, indirect, pp)

    def direct_object(self, verb: Verb) -> NP:
        spec = verb.obj
        if verb.generic and self.chance(0.35):
            # Generic objects of love/like: "I love cats." / "I like water."
            noun = self.choice(self.nouns(spec))
            return NounPhrase(
                noun,
                "bare",
                not noun.mass,
                None if self.chance(0.7) else self.choice(self.adjectives_for(noun)),
            )
        if not self.simple and self.chance(0.07):
            return self.coordination(spec, "obj")
        return self.participant(spec, "obj")

    def _place_pp(self, frame: str) -> PP:
        flag = "+in" if frame == "loc" else "+goal"
        prep = {"goal": "to", "source": "from", "loc": "in"}[frame]
        if self.chance(0.4):
            return PP(prep, self.city())  # type: ignore[arg-type]
        return PP(prep, self.noun_phrase(self.choice(self.nouns(frozenset({flag}))), "pp"))  # type: ignore[arg-type]

    def adjunct(self, prep: str) -> PP:
        if prep == "in":
            if self.chance(0.3):
                return PP("in", self.city())
            return PP("in", self.noun_phrase(self.choice(self.nouns(frozenset({"+in"}))), "pp", adj_p=0.15))
        return PP("with", self.participant(frozenset({"person", "animal"}), "pp", 0.3))

    def adjective_clause(self) -> tuple[NP, AdjectivePredicate]:
        # Pronouns whose gender or number is unknown only take adjectives with identical forms:
        # "I am sad." (epicene singular), "We are rich." (epicene plural); "you" never.
        r = self.rng.random()
        if r < 0.25:
            person = self.choice(("I", "he", "she", "we", "they"))
            fits = [
                a
                for a in self._person_adjectives()
                if (person != "I" or a.epicene_sg) and (person != "we" or a.epicene_pl)
            ]
            return PronounNP(person), AdjectivePredicate(self.choice(fits))  # type: ignore[arg-type]
        if r < 0.35:
            return self.name(), AdjectivePredicate(self.choice(self._person_adjectives()))
        subject = self.subject(
            frozenset(
                {"person", "animal", "food", "drink", "text", "thing", "place", "nature", "time", "body"}
            ),
            pronouns=("they",),
        )
        return subject, AdjectivePredicate(self.choice(self._adjectives_for_np(subject)))

    def _person_adjectives(self) -> tuple[Adjective, ...]:
        return self.adjectives_for(self.lex.noun("man"))

    def _adjectives_for_np(self, np: NP) -> Sequence[Adjective]:
        if isinstance(np, NounPhrase):
            return self.adjectives_for(np.noun)
        if isinstance(np, CoordNP):
            heads = [i.noun for i in np.items if isinstance(i, NounPhrase)]
            return [a for a in self._person_adjectives() if all(a.fits(n) for n in heads)]
        return self._person_adjectives()

    def locative_clause(self) -> tuple[NP, LocativePredicate]:
        if self.chance(0.7):
            subject = self.subject(frozenset({"person", "animal", "thing", "text", "food"}))
            return subject, LocativePredicate(self.adjunct("in"))
        return self.subject(frozenset({"person", "animal"})), LocativePredicate(self.adjunct("with"))

    # -- clauses and sentences ------------------------------------------------------------------
    def clause(self, shape: str | None = None, allow_question: bool = True) -> Clause:
        subject, pred = self.predicate(shape or self.weighted(SHAPES))
        mode = self.weighted((("plain", 65), ("neg", 20), ("question", 15 if allow_question else 0)))
        return finalise_clause(Clause(subject, pred, mode == "neg", mode == "question"))

    def sentence(self) -> Sentence:
        if self.chance(0.07):
            self.simple = True
            try:
                return Sentence((self.clause(allow_question=False), self.clause(allow_question=False)))
            finally:
                self.simple = False
        return Sentence((self.clause(),))


def finalise_clause(clause: Clause) -> Clause:
    """Repairs combinations that standard French would render differently or ambiguously.

    Under negation a number object ("pas deux chats") reads as contrastive and a coordinated object
    would need ni ... ni, so such objects are turned into plain definite phrases.
    """
    pred = clause.predicate
    if not clause.negated or not isinstance(pred, VerbPredicate) or pred.obj is None:
        return clause
    obj = pred.obj
    if isinstance(obj, CoordNP):
        obj = obj.items[0]
    if isinstance(obj, NounPhrase) and obj.det == "num":
        obj = NounPhrase(obj.noun, "def", obj.plural, obj.adjective, None, None, obj.of)
    if obj is pred.obj:
        return clause
    new_pred = VerbPredicate(pred.verb, pred.frame, obj, pred.indirect, pred.pp)
    return Clause(clause.subject, new_pred, clause.negated, clause.question)
