"""Hand-specified sentences built from lemmas, with their expected renderings.

They serve twice: as a regression table for the realisers (tests) and as anchor pairs that are
always placed in the training split (e.g. "I love cats." -> "J'aime les chats.").
"""

from __future__ import annotations

from typing import Literal

from .lexicon import Lexicon
from .structures import (
    NP,
    PP,
    AdjectivePredicate,
    Clause,
    CoordNP,
    Det,
    LocativePredicate,
    NameKind,
    NameNP,
    NounPhrase,
    Possessor,
    PronounNP,
    Sentence,
    VerbPredicate,
)


class Builder:
    """Terse constructors: ``b.np("cat", "bare", plural=True)``, ``b.say("I", "love", obj)``."""

    def __init__(self, lexicon: Lexicon) -> None:
        self.lex = lexicon

    def np(
        self,
        noun: str,
        det: Det = "def",
        plural: bool = False,
        adj: str | None = None,
        poss: Possessor | None = None,
        count: int | None = None,
        of: NounPhrase | NameNP | None = None,
    ) -> NounPhrase:
        adjective = self.lex.adjective(adj) if adj else None
        return NounPhrase(self.lex.noun(noun), det, plural, adjective, poss, count, of)

    def name(self, text: str, kind: NameKind = "person") -> NameNP:
        return NameNP(self.lex.name(text), kind)

    def subj(self, subject: NP | str) -> NP:
        if isinstance(subject, str):
            return PronounNP(subject)  # type: ignore[arg-type]
        return subject

    def say(
        self,
        subject: NP | str,
        verb: str,
        obj: NP | None = None,
        *,
        frame: str | None = None,
        to: NP | None = None,
        pp: PP | None = None,
        neg: bool = False,
        q: bool = False,
    ) -> Clause:
        v = self.lex.verb(verb)
        if frame is None:
            frame = (
                "ditr"
                if obj is not None and to is not None
                else (
                    "tr"
                    if obj is not None
                    else ("io" if to is not None else sorted(v.frames - {"tr", "ditr", "io"})[0])
                )
            )
        return Clause(self.subj(subject), VerbPredicate(v, frame, obj, to, pp), neg, q)

    def be(self, subject: NP | str, adj: str, neg: bool = False, q: bool = False) -> Clause:
        return Clause(self.subj(subject), AdjectivePredicate(self.lex.adjective(adj)), neg, q)

    def be_at(
        self, subject: NP | str, prep: Literal["in", "with"], np: NP, neg: bool = False, q: bool = False
    ) -> Clause:
        return Clause(self.subj(subject), LocativePredicate(PP(prep, np)), neg, q)

    @staticmethod
    def s(*clauses: Clause) -> Sentence:
        return Sentence(tuple(clauses))


def known_pairs(lexicon: Lexicon) -> list[tuple[Sentence, str, str]]:
    b = Builder(lexicon)
    s, np, say = b.s, b.np, b.say
    return [
        (s(say("I", "love", np("cat", "bare", True))), "I love cats.", "J'aime les chats."),
        (s(say("I", "see", np("cat", "bare", True))), "I see cats.", "Je vois des chats."),
        (s(say("I", "drink", np("water", "bare"))), "I drink water.", "Je bois de l'eau."),
        (s(say("we", "eat", np("bread", "bare"))), "We eat bread.", "Nous mangeons du pain."),
        (s(say("I", "like", np("water", "bare"))), "I like water.", "J'aime l'eau."),
        (s(say("I", "see", np("cat", "indef"), neg=True)), "I do not see a cat.", "Je ne vois pas de chat."),
        (s(say("I", "see", np("cat"), neg=True)), "I do not see the cat.", "Je ne vois pas le chat."),
        (
            s(say("she", "drink", np("water", "bare"), neg=True)),
            "She does not drink water.",
            "Elle ne boit pas d'eau.",
        ),
        (
            s(say("I", "love", np("cat", "bare", True), neg=True)),
            "I do not love cats.",
            "Je n'aime pas les chats.",
        ),
        (
            s(say("he", "have", np("car", "indef"), neg=True)),
            "He does not have a car.",
            "Il n'a pas de voiture.",
        ),
        (s(say("you", "see", np("cat"), q=True)), "Do you see the cat?", "Est-ce que vous voyez le chat ?"),
        (s(b.be(np("car"), "red", q=True)), "Is the car red?", "Est-ce que la voiture est rouge ?"),
        (s(say(b.name("Alice"), "read", q=True)), "Does Alice read?", "Est-ce qu'Alice lit ?"),
        (s(say("he", "sleep", q=True)), "Does he sleep?", "Est-ce qu'il dort ?"),
        (s(say("I", "speak", to=np("teacher"))), "I speak to the teacher.", "Je parle au professeur."),
        (s(say("I", "look at", np("bird"))), "I look at the bird.", "Je regarde l'oiseau."),
        (
            s(say("I", "give", np("book"), to=np("child", plural=True))),
            "I give the book to the children.",
            "Je donne le livre aux enfants.",
        ),
        (s(b.be(np("man", adj="old"), "happy")), "The old man is happy.", "Le vieil homme est heureux."),
        (s(say("I", "see", np("school", "dem"))), "I see this school.", "Je vois cette école."),
        (s(say("I", "see", np("man", "dem"))), "I see this man.", "Je vois cet homme."),
        (s(say("I", "see", np("man", "dem", adj="old"))), "I see this old man.", "Je vois ce vieil homme."),
        (s(say("I", "love", np("school", "poss", poss="my"))), "I love my school.", "J'aime mon école."),
        (
            s(say("I", "love", np("school", "poss", poss="my", adj="old"))),
            "I love my old school.",
            "J'aime ma vieille école.",
        ),
        (
            s(say("I", "see", np("car", "num", True, count=21))),
            "I see twenty-one cars.",
            "Je vois vingt et une voitures.",
        ),
        (
            s(say("I", "see", np("dog", "num", True, count=21))),
            "I see twenty-one dogs.",
            "Je vois vingt et un chiens.",
        ),
        (
            s(say("we", "have", np("book", "num", True, count=80))),
            "We have eighty books.",
            "Nous avons quatre-vingts livres.",
        ),
        (
            s(say("they", "buy", np("apple", "num", True, count=99))),
            "They buy ninety-nine apples.",
            "Ils achètent quatre-vingt-dix-neuf pommes.",
        ),
        (s(say("I", "see", np("car", "num", count=1))), "I see one car.", "Je vois une voiture."),
        (
            s(b.be(CoordNP((np("cat"), np("car"))), "black")),
            "The cat and the car are black.",
            "Le chat et la voiture sont noirs.",
        ),
        (s(b.be(np("car", plural=True), "red")), "The cars are red.", "Les voitures sont rouges."),
        (
            s(say("I", "see", np("dog", "bare", True, adj="big"))),
            "I see big dogs.",
            "Je vois de grands chiens.",
        ),
        (
            s(say("I", "see", np("tree", "indef", adj="beautiful"))),
            "I see a beautiful tree.",
            "Je vois un bel arbre.",
        ),
        (s(b.be(np("hotel", adj="new"), "big")), "The new hotel is big.", "Le nouvel hôtel est grand."),
        (
            s(b.be_at(np("cat"), "in", np("garden"))),
            "The cat is in the garden.",
            "Le chat est dans le jardin.",
        ),
        (
            s(b.be_at(b.name("Alice"), "in", b.name("Paris", "city"))),
            "Alice is in Paris.",
            "Alice est à Paris.",
        ),
        (s(say("we", "go", pp=PP("to", np("school")))), "We go to the school.", "Nous allons à l'école."),
        (s(say("they", "go", pp=PP("to", np("house")))), "They go to the house.", "Ils vont à la maison."),
        (
            s(say("he", "come", pp=PP("from", np("market")))),
            "He comes from the market.",
            "Il vient du marché.",
        ),
        (
            s(say("I", "see", np("door", of=np("house")))),
            "I see the door of the house.",
            "Je vois la porte de la maison.",
        ),
        (
            s(say("I", "see", np("friend", of=b.name("Alice")))),
            "I see the friend of Alice.",
            "Je vois l'ami d'Alice.",
        ),
        (
            s(say("I", "see", np("car", of=np("child", plural=True)))),
            "I see the car of the children.",
            "Je vois la voiture des enfants.",
        ),
        (s(say("she", "read", np("book", "poss", poss="her"))), "She reads her book.", "Elle lit son livre."),
        (
            s(say("he", "drive", np("car", "poss", poss="his"))),
            "He drives his car.",
            "Il conduit sa voiture.",
        ),
        (s(say("we", "start", np("lesson"))), "We start the lesson.", "Nous commençons la leçon."),
        (s(say("she", "call", np("dog"))), "She calls the dog.", "Elle appelle le chien."),
        (s(say("they", "throw", np("ball"))), "They throw the ball.", "Ils jettent le ballon."),
        (s(say("he", "prefer", np("tea", "bare"))), "He prefers tea.", "Il préfère le thé."),
        (s(say("you", "write", np("letter", "indef"))), "You write a letter.", "Vous écrivez une lettre."),
        (
            s(say("we", "open", np("window", "poss", True, poss="your"))),
            "We open your windows.",
            "Nous ouvrons vos fenêtres.",
        ),
        (
            s(say("I", "eat", np("bread", "bare")), say("she", "drink", np("milk", "bare"))),
            "I eat bread and she drinks milk.",
            "Je mange du pain et elle boit du lait.",
        ),
        (
            s(say("I", "live", pp=PP("in", b.name("Amsterdam", "city")))),
            "I live in Amsterdam.",
            "Je vis à Amsterdam.",
        ),
        (
            s(say("she", "come", pp=PP("from", b.name("Oslo", "city")))),
            "She comes from Oslo.",
            "Elle vient d'Oslo.",
        ),
        (s(say(b.name("Paul"), "speak", to=b.name("Emma"))), "Paul speaks to Emma.", "Paul parle à Emma."),
        (
            s(say("I", "answer", to=np("teacher", plural=True))),
            "I answer the teachers.",
            "Je réponds aux professeurs.",
        ),
        (
            s(say("he", "eat", np("apple", "bare", True), neg=True)),
            "He does not eat apples.",
            "Il ne mange pas de pommes.",
        ),
        (
            s(say("I", "want", np("horse", "num", True, count=71))),
            "I want seventy-one horses.",
            "Je veux soixante et onze chevaux.",
        ),
        (
            s(say("she", "see", np("bird", "num", True, count=81))),
            "She sees eighty-one birds.",
            "Elle voit quatre-vingt-un oiseaux.",
        ),
        (
            s(say("I", "have", np("egg", "num", True, count=100))),
            "I have one hundred eggs.",
            "J'ai cent œufs.",
        ),
    ]
