"""French surface realisation: determiners, agreement, elision, contraction and spacing.

Words are first produced as tokens that know whether they start with a vowel sound (the lexicon
flags h-muet nouns). Elision (l', d', j', n', qu'), cet and mon-before-feminine-vowel are then
decided by the NEXT token in one pass, and à/de + le/les are contracted afterwards, because
"à l'école" must not become "au école".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .lexicon import starts_with_vowel
from .numbers import french_number, is_feminine_form
from .structures import (
    NP,
    PP,
    AdjectivePredicate,
    Clause,
    CoordNP,
    LocativePredicate,
    NameNP,
    NounPhrase,
    PronounNP,
    Sentence,
    VerbPredicate,
    is_feminine,
    is_plural,
    person_index,
)

ETRE = ("suis", "es", "est", "sommes", "êtes", "sont")
SUBJECT_PRONOUNS = {"I": "je", "you": "vous", "he": "il", "she": "elle", "we": "nous", "they": "ils"}
# (masculine singular, feminine singular, plural); ma/sa become mon/son before a vowel in the pass.
POSSESSIVES = {
    "my": ("mon", "ma", "mes"),
    "your": ("votre", "votre", "vos"),
    "his": ("son", "sa", "ses"),
    "her": ("son", "sa", "ses"),
    "our": ("notre", "notre", "nos"),
    "their": ("leur", "leur", "leurs"),
}
ELIDABLE = {"le", "la", "de", "je", "ne", "que"}
CONTRACTIONS = {("à", "le"): "au", ("à", "les"): "aux", ("de", "le"): "du", ("de", "les"): "des"}


@dataclass(slots=True)
class Tok:
    text: str
    vowel: bool
    # "art": definite article; "des": indefinite plural article; "prep": à and every de (contracts
    # with a following le/les, elides before a vowel); "fn": je, ne, que; "ce"/"poss_f": become
    # cet / mon, son before a vowel.
    kind: str = "word"
    glue: bool = False  # elided: attach the next token without a space


def word(text: str, vowel: bool | None = None) -> Tok:
    # "onze" takes no elision (le onze, de onze) although it starts with a vowel.
    return Tok(text, starts_with_vowel(text) and not text.startswith("onze") if vowel is None else vowel)


class FrenchRealiser:
    """Renders structures; collects tags for the phenomena it actually produced."""

    def __init__(self) -> None:
        self.tags: set[str] = set()

    # -- noun phrases -------------------------------------------------------------------------
    def noun_phrase(self, np: NP, neg: bool = False, generic: bool = False) -> list[Tok]:
        if isinstance(np, PronounNP):
            text = SUBJECT_PRONOUNS[np.person]
            return [Tok(text, starts_with_vowel(text), "fn" if text == "je" else "word")]
        if isinstance(np, NameNP):
            self.tags.add({"person": "name", "pseudo": "pseudo_name", "city": "city"}[np.kind])
            return [word(np.name.text, np.name.vowel)]
        if isinstance(np, CoordNP):
            out: list[Tok] = []
            for i, item in enumerate(np.items):
                if i:
                    out.append(word("et"))
                out += self.noun_phrase(item, neg, generic)
            return out
        return self._common(np, neg, generic)

    def _common(self, np: NounPhrase, neg: bool, generic: bool) -> list[Tok]:
        noun, adj = np.noun, np.adjective
        pre = adj is not None and adj.prenominal
        toks = self._determiner(np, neg, generic, pre)
        if noun.irregular_plural and np.plural:
            self.tags.add("irregular_plural")
        if noun.vowel and noun.fr.startswith(("h", "H")):
            self.tags.add("h_muet")
        if adj is not None and pre:
            self.tags.add("preposed_adjective")
            form = adj.form(noun.feminine, np.plural)
            if adj.liaison and noun.vowel and not noun.feminine and not np.plural:
                form = adj.liaison
                self.tags.add("liaison_adjective")
            toks.append(Tok(form, adj.vowel))
        toks.append(Tok(noun.fr_pl if np.plural else noun.fr, noun.vowel))
        if adj is not None and not pre:
            self.tags.add("postposed_adjective")
            toks.append(Tok(adj.form(noun.feminine, np.plural), adj.vowel))
        if np.of is not None:
            self.tags.add("preposition_de")
            toks.append(Tok("de", False, "prep"))
            toks += self.noun_phrase(np.of)
        return toks

    def _determiner(self, np: NounPhrase, neg: bool, generic: bool, pre: bool) -> list[Tok]:
        fem, pl, det = np.noun.feminine, np.plural, np.det
        definite = Tok("les" if pl else ("la" if fem else "le"), False, "art")
        if det == "def":
            return [definite]
        if det == "dem":
            self.tags.add("demonstrative")
            if pl or fem:
                return [Tok("ces" if pl else "cette", False)]
            return [Tok("ce", False, "ce")]
        if det == "poss":
            assert np.possessor is not None
            self.tags.add("possessive")
            forms = POSSESSIVES[np.possessor]
            text = forms[2] if pl else forms[1 if fem else 0]
            return [Tok(text, False, "poss_f" if text in ("ma", "sa") else "word")]
        if det == "num":
            assert np.count is not None
            self.tags.add("number")
            if fem and is_feminine_form(np.count):
                self.tags.add("number_feminine")
            return [word(french_number(np.count, fem))]
        if generic and det == "bare":
            # love/like/prefer/hate + bare noun: generic reading, definite article (kept under negation).
            self.tags.add("generic_mass_definite" if np.noun.mass else "generic_plural_definite")
            return [definite]
        if neg:
            # Indefinite and partitive articles of a negated direct object become de.
            self.tags.add("negation_de")
            return [Tok("de", False, "prep")]
        if det == "indef":
            return [Tok("une" if fem else "un", True)]
        if np.noun.mass:
            self.tags.add("partitive")
            return [Tok("de", False, "prep"), definite]
        if pre:
            self.tags.add("indefinite_de_adjective")
            return [Tok("de", False, "prep")]
        return [Tok("des", False, "des")]

    # -- clauses --------------------------------------------------------------------------------
    def pp(self, pp: PP) -> list[Tok]:
        if pp.prep == "with":
            prep = "avec"
        elif pp.prep == "from":
            prep = "de"
        elif pp.prep == "in" and not (isinstance(pp.np, NameNP) and pp.np.kind == "city"):
            prep = "dans"
        else:
            prep = "à"  # to X, and in + city (à Paris)
        self.tags.add(
            {
                "avec": "preposition_avec",
                "de": "preposition_de",
                "dans": "preposition_dans",
                "à": "preposition_a",
            }[prep]
        )
        head = Tok(prep, prep == "avec", "prep" if prep in ("à", "de") else "word")
        return [head, *self.noun_phrase(pp.np)]

    def clause(self, clause: Clause) -> list[Tok]:
        toks: list[Tok] = []
        if clause.question:
            self.tags.add("question")
            toks += [word("est-ce"), Tok("que", False, "fn")]
        toks += self.noun_phrase(clause.subject)
        pred = clause.predicate
        person = person_index(clause.subject)
        if isinstance(pred, VerbPredicate):
            form = pred.verb.forms[person]
            if pred.verb.vclass == "irregular":
                self.tags.add("irregular_verb")
            elif (
                pred.verb.vclass == "er_spelling"
                and form != pred.verb.fr_inf[:-2] + ("e", "es", "e", "ons", "ez", "ent")[person]
            ):
                self.tags.add("spelling_change")
        else:
            form = ETRE[person]
            self.tags.add("irregular_verb")
        if clause.negated:
            self.tags.add("negation")
            toks += [Tok("ne", False, "fn"), word(form), word("pas")]
        else:
            toks.append(word(form))
        return toks + self._complements(clause)

    def _complements(self, clause: Clause) -> list[Tok]:
        pred = clause.predicate
        if isinstance(pred, AdjectivePredicate):
            self.tags.add("predicative_adjective")
            fem, pl = is_feminine(clause.subject), is_plural(clause.subject)
            return [Tok(pred.adjective.form(fem, pl), pred.adjective.vowel)]
        if isinstance(pred, LocativePredicate):
            return self.pp(pred.pp)
        toks: list[Tok] = []
        if pred.obj is not None:
            toks += self.noun_phrase(pred.obj, neg=clause.negated, generic=pred.verb.generic)
        if pred.indirect is not None:
            self.tags.add("preposition_a")
            toks += [Tok("à", False, "prep"), *self.noun_phrase(pred.indirect)]
        if pred.pp is not None:
            toks += self.pp(pred.pp)
        return toks

    def sentence(self, sentence: Sentence) -> str:
        toks: list[Tok] = []
        for i, clause in enumerate(sentence.clauses):
            if i:
                toks.append(word("et"))
            toks += self.clause(clause)
        text = self.finish(toks)
        question = any(c.question for c in sentence.clauses)
        return text[0].upper() + text[1:] + (" ?" if question else ".")

    # -- surface pass ----------------------------------------------------------------------------
    def finish(self, toks: list[Tok]) -> str:
        toks = self._drop_des_after_de(toks)
        self._elide(toks)
        toks = self._contract(toks)
        parts: list[str] = []
        for tok in toks:
            parts.append(tok.text)
            if not tok.glue:
                parts.append(" ")
        return "".join(parts).rstrip()

    @staticmethod
    def _drop_des_after_de(toks: list[Tok]) -> list[Tok]:
        # de + des -> de ("the house of cats" would be "la maison de chats"); kept for safety.
        return [t for i, t in enumerate(toks) if not (t.kind == "des" and i and toks[i - 1].text == "de")]

    def _elide(self, toks: list[Tok]) -> None:
        for tok, nxt in itertools.pairwise(toks):
            if not nxt.vowel:
                continue
            if tok.kind in ("art", "fn", "prep") and tok.text in ELIDABLE:
                tok.text = tok.text[:-1] + "'"
                tok.glue = True
                self.tags.add("elision")
            elif tok.kind == "ce":
                tok.text = "cet"
                self.tags.add("demonstrative_cet")
            elif tok.kind == "poss_f":
                tok.text = "mon" if tok.text == "ma" else "son"
                self.tags.add("possessive_mon_feminine")

    def _contract(self, toks: list[Tok]) -> list[Tok]:
        out: list[Tok] = []
        for tok in toks:
            if out and out[-1].kind == "prep" and tok.kind == "art":
                merged = CONTRACTIONS.get((out[-1].text, tok.text))
                if merged is not None:
                    self.tags.add("contraction_" + merged)
                    out[-1] = Tok(merged, False, "word")
                    continue
            out.append(tok)
        return out


def realise_french(sentence: Sentence) -> tuple[str, frozenset[str]]:
    realiser = FrenchRealiser()
    text = realiser.sentence(sentence)
    return text, frozenset(realiser.tags)
