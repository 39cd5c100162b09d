"""English surface realisation (present simple, full forms: "do not", never "don't")."""

from __future__ import annotations

from .numbers import english_number
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
    person_index,
)

# "an" is chosen by sound, not spelling; these are the words in the lexicon where they differ.
_VOWEL_SOUND_H = ("hour", "honest", "heir", "honor")
_CONSONANT_SOUND_VOWEL = ("one", "use", "uni", "euro")


def _takes_an(word: str) -> bool:
    lower = word.lower()
    if lower.startswith(_VOWEL_SOUND_H):
        return True
    if lower.startswith(_CONSONANT_SOUND_VOWEL):
        return False
    return lower[:1] in ("a", "e", "i", "o", "u")


def noun_phrase(np: NP) -> list[str]:
    if isinstance(np, PronounNP):
        return [np.person]
    if isinstance(np, NameNP):
        return [np.name.text]
    if isinstance(np, CoordNP):
        out: list[str] = []
        for i, item in enumerate(np.items):
            if i:
                out.append("and")
            out += noun_phrase(item)
        return out
    return _common(np)


def _common(np: NounPhrase) -> list[str]:
    words: list[str] = []
    if np.det == "def":
        words.append("the")
    elif np.det == "indef":
        words.append("a")  # becomes "an" once the next word is known
    elif np.det == "dem":
        words.append("these" if np.plural else "this")
    elif np.det == "poss":
        assert np.possessor is not None
        words.append(np.possessor)
    elif np.det == "num":
        assert np.count is not None
        words.append(english_number(np.count))
    if np.adjective is not None:
        words.append(np.adjective.en)
    words.append(np.noun.en_pl if np.plural else np.noun.en)
    if np.of is not None:
        words += ["of", *noun_phrase(np.of)]
    if words[0] == "a" and _takes_an(words[1]):
        words[0] = "an"
    return words


def _pp(pp: PP) -> list[str]:
    return [pp.prep, *noun_phrase(pp.np)]


def _be(person: int) -> str:
    return "am" if person == 0 else ("is" if person == 2 else "are")


def clause(cl: Clause) -> list[str]:
    subject = noun_phrase(cl.subject)
    person = person_index(cl.subject)
    pred = cl.predicate
    rest = _complements(cl)
    if not isinstance(pred, VerbPredicate):
        be = _be(person)
        if cl.question:
            return [be.capitalize(), *subject, *(["not"] if cl.negated else []), *rest]
        return [*subject, be, *(["not"] if cl.negated else []), *rest]
    verb = pred.verb
    particle = [verb.particle] if verb.particle and pred.frame == "tr" else []
    third = person == 2
    if cl.question or cl.negated:
        aux = "does" if third else "do"
        head = [aux.capitalize(), *subject] if cl.question else [*subject, aux]
        return [*head, *(["not"] if cl.negated else []), verb.en_base, *particle, *rest]
    form = verb.en_3sg_base if third else verb.en_base
    return [*subject, form, *particle, *rest]


def _complements(cl: Clause) -> list[str]:
    pred = cl.predicate
    if isinstance(pred, AdjectivePredicate):
        return [pred.adjective.en]
    if isinstance(pred, LocativePredicate):
        return _pp(pred.pp)
    words: list[str] = []
    if pred.obj is not None:
        words += noun_phrase(pred.obj)
    if pred.indirect is not None:
        words += ([pred.verb.io_prep] if pred.verb.io_prep else []) + noun_phrase(pred.indirect)
    if pred.pp is not None:
        words += _pp(pred.pp)
    return words


def realise_english(sentence: Sentence) -> str:
    words: list[str] = []
    for i, cl in enumerate(sentence.clauses):
        if i:
            words.append("and")
        words += clause(cl)
    text = " ".join(words)
    question = any(c.question for c in sentence.clauses)
    return text[0].upper() + text[1:] + ("?" if question else ".")
