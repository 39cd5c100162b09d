"""Tests for the synthetic English→French corpus generator (export.corpus)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from export.corpus import CorpusConfig, Pair, generate_corpus, read_pairs, write_corpus
from export.corpus.examples import known_pairs
from export.corpus.lexicon import load_lexicon
from export.corpus.numbers import english_number, french_number
from export.corpus.splits import CorpusBuilder, make_pair

REPO = Path(__file__).resolve().parents[2]
SMALL = CorpusConfig(seed=7, train_size=6000, valid_size=300, test_size=300, heldout_size=400)
VOWEL = "aeiouyéèêàâîôûœ"


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[Pair]]:
    return generate_corpus(SMALL)


@pytest.fixture(scope="module")
def train_fr(corpus: dict[str, list[Pair]]) -> list[str]:
    return [p.fr for p in corpus["train"]]


# -- lexicon ---------------------------------------------------------------------------------------
def test_lexicon_size_and_required_words() -> None:
    lex = load_lexicon()
    assert sum(lex.lemma_counts().values()) >= 400
    nouns = (
        "cat dog house car book apple tree man woman child friend city school teacher bird table door "
        "water bread letter garden river window horse flower student song street boat girl boy"
    )
    for noun in nouns.split(" "):
        lex.noun(noun)
    adjectives = "red black white green blue big small old new beautiful good young happy fast interesting"
    for adj in adjectives.split(" "):
        lex.adjective(adj)
    for verb in (
        "love",
        "like",
        "eat",
        "drink",
        "see",
        "have",
        "be",
        "want",
        "read",
        "write",
        "find",
        "look at",
        "speak",
        "open",
        "close",
        "buy",
        "give",
    ):
        lex.verb(verb)
    assert lex.noun("horse").fr_pl == "chevaux" and lex.noun("eye").fr_pl == "yeux"
    assert lex.noun("man").vowel and lex.noun("hotel").vowel  # h-muet counts as a vowel
    assert lex.verb("be").forms == ("suis", "es", "est", "sommes", "êtes", "sont")


def test_one_french_form_per_english_lemma() -> None:
    lex = load_lexicon()
    for items in (lex.nouns, lex.adjectives, lex.verbs):
        keys = [item.en for item in items]
        assert len(keys) == len(set(keys))
    nouns = [n.fr for n in lex.nouns]
    assert len(nouns) == len(set(nouns))


# -- numbers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "en", "masc", "fem"),
    [
        (1, "one", "un", "une"),
        (16, "sixteen", "seize", "seize"),
        (17, "seventeen", "dix-sept", "dix-sept"),
        (21, "twenty-one", "vingt et un", "vingt et une"),
        (22, "twenty-two", "vingt-deux", "vingt-deux"),
        (31, "thirty-one", "trente et un", "trente et une"),
        (61, "sixty-one", "soixante et un", "soixante et une"),
        (70, "seventy", "soixante-dix", "soixante-dix"),
        (71, "seventy-one", "soixante et onze", "soixante et onze"),
        (72, "seventy-two", "soixante-douze", "soixante-douze"),
        (80, "eighty", "quatre-vingts", "quatre-vingts"),
        (81, "eighty-one", "quatre-vingt-un", "quatre-vingt-une"),
        (90, "ninety", "quatre-vingt-dix", "quatre-vingt-dix"),
        (91, "ninety-one", "quatre-vingt-onze", "quatre-vingt-onze"),
        (99, "ninety-nine", "quatre-vingt-dix-neuf", "quatre-vingt-dix-neuf"),
        (100, "one hundred", "cent", "cent"),
    ],
)
def test_number_words(n: int, en: str, masc: str, fem: str) -> None:
    assert english_number(n) == en
    assert french_number(n) == masc
    assert french_number(n, feminine=True) == fem


def test_number_spelling_rules_for_all() -> None:
    seen = set()
    for n in range(1, 101):
        fr = french_number(n)
        seen.add(fr)
        assert (" et " in fr) == (n in (21, 31, 41, 51, 61, 71)), fr
        assert fr.endswith("vingts") == (n == 80), fr
        if n > 16 and n % 10 and n not in (21, 31, 41, 51, 61, 71, 100):
            assert "-" in fr, fr
    assert len(seen) == 100
    with pytest.raises(ValueError):
        french_number(101)


# -- hand-checked renderings -----------------------------------------------------------------------
KNOWN = known_pairs(load_lexicon())


@pytest.mark.parametrize(("sentence", "en", "fr"), KNOWN, ids=[en for _, en, _ in KNOWN])
def test_known_pair(sentence: object, en: str, fr: str) -> None:
    pair = make_pair(sentence)  # type: ignore[arg-type]
    assert (pair.en, pair.fr) == (en, fr)


def test_known_pairs_table_is_large_enough() -> None:
    assert len(KNOWN) >= 30
    expected = {en: fr for _, en, fr in KNOWN}
    assert expected["I love cats."] == "J'aime les chats."


def test_known_pairs_tags() -> None:
    tags = {en: make_pair(s).tags for s, en, _ in KNOWN}
    assert "generic_plural_definite" in tags["I love cats."]
    assert "partitive" in tags["I drink water."] and "elision" in tags["I drink water."]
    assert "contraction_du" in tags["We eat bread."] and "spelling_change" in tags["We eat bread."]
    assert "negation_de" in tags["I do not see a cat."]
    assert "contraction_aux" in tags["I give the book to the children."]
    assert "liaison_adjective" in tags["The old man is happy."]
    assert "demonstrative_cet" in tags["I see this man."]
    assert "possessive_mon_feminine" in tags["I love my school."]
    assert "possessive_mon_feminine" not in tags["I love my old school."]
    assert "number_feminine" in tags["I see twenty-one cars."]
    assert "mixed_gender_agreement" in tags["The cat and the car are black."]


# -- determinism -----------------------------------------------------------------------------------
def test_same_seed_same_corpus(corpus: dict[str, list[Pair]]) -> None:
    assert generate_corpus(SMALL) == corpus


def test_different_seed_differs(corpus: dict[str, list[Pair]]) -> None:
    config = CorpusConfig(seed=8, train_size=300, valid_size=50, test_size=50, heldout_size=50)
    other = generate_corpus(config)
    assert [p.en for p in other["valid"]] != [p.en for p in corpus["valid"][:50]]


def _run_cli(out: Path, hashseed: str) -> dict[str, bytes]:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    cmd = [
        sys.executable,
        "-m",
        "export.corpus",
        "--out",
        str(out),
        "--seed",
        "3",
        "--train-size",
        "2000",
        "--valid-size",
        "100",
        "--test-size",
        "100",
        "--heldout-size",
        "100",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert "train=2000" in result.stdout
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())}


def test_byte_identical_across_processes(tmp_path: Path) -> None:
    first = _run_cli(tmp_path / "a", "1")
    second = _run_cli(tmp_path / "b", "987")
    assert sorted(first) == [
        "heldout.tsv",
        "heldout_combinations.json",
        "stats.json",
        "test.tsv",
        "train.tsv",
        "valid.tsv",
    ]
    assert first == second


def test_write_and_read_roundtrip(tmp_path: Path, corpus: dict[str, list[Pair]]) -> None:
    write_corpus(corpus, tmp_path)
    for split, pairs in corpus.items():
        assert read_pairs(tmp_path / f"{split}.tsv") == [(p.en, p.fr) for p in pairs]


# -- splits ----------------------------------------------------------------------------------------
def test_split_sizes_and_anchor(corpus: dict[str, list[Pair]]) -> None:
    sizes = {k: len(v) for k, v in corpus.items()}
    assert sizes == {"train": 6000, "valid": 300, "test": 300, "heldout": 400}
    assert ("I love cats.", "J'aime les chats.") in {(p.en, p.fr) for p in corpus["train"]}


def test_no_source_sentence_in_two_splits(corpus: dict[str, list[Pair]]) -> None:
    sets = {name: {p.en for p in pairs} for name, pairs in corpus.items()}
    names = sorted(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b], (a, b)
    for name in ("valid", "test", "heldout"):
        assert len(sets[name]) == len(corpus[name])
    assert len(sets["train"]) > 0.9 * len(corpus["train"])  # duplicates in train stay rare


def test_heldout_combinations_absent_elsewhere(corpus: dict[str, list[Pair]]) -> None:
    heldout_keys = {key for p in corpus["heldout"] for key in p.combos}
    assert len(heldout_keys) >= 60
    assert all(p.combos for p in corpus["heldout"])
    for name in ("train", "valid", "test"):
        for pair in corpus[name]:
            assert not pair.combos & heldout_keys, (name, pair.en)
    # Independent surface check: no attributive "adjective noun" of a held-out pair in train English.
    lex = load_lexicon()
    train_en = "\n".join(p.en.lower() for p in corpus["train"])
    for key in sorted(k for k in heldout_keys if k.startswith("an:")):
        adj, noun = key[3:].split("|")
        forms = {lex.noun(noun).en, lex.noun(noun).en_pl} - {"-"}
        for form in forms:
            assert not re.search(rf"\b{adj} {form}\b", train_en), key


def test_heldout_sentences_contain_their_combination(corpus: dict[str, list[Pair]]) -> None:
    lex = load_lexicon()
    for pair in corpus["heldout"]:
        words = set(re.findall(r"[\w-]+", pair.en.lower()))
        for key in pair.combos:
            lemmas = key.split(":", 1)[1].split("|")
            for lemma in lemmas:
                if key.startswith("svo:") and lemma == lemmas[1]:
                    verb = lex.verb(lemma)
                    assert {verb.en_base, verb.en_3sg_base} & words, (key, pair.en)
                    continue
                if key.startswith("an:") and lemma == lemmas[0]:
                    assert lemma in words, (key, pair.en)
                    continue
                noun = lex.noun(lemma)
                assert {noun.en, noun.en_pl} & words, (key, pair.en)


def test_eval_pseudo_names_unseen_in_train(corpus: dict[str, list[Pair]]) -> None:
    builder = CorpusBuilder(SMALL)
    eval_names = {n.text for n in builder.eval_names}
    train_names = {n.text for n in builder.train_names}
    assert not eval_names & train_names
    seen_words = {w for name in ("train", "valid") for p in corpus[name] for w in re.findall(r"\w+", p.en)}
    assert not eval_names & seen_words
    eval_words = {w for name in ("test", "heldout") for p in corpus[name] for w in re.findall(r"\w+", p.en)}
    assert eval_names & eval_words  # the evaluation splits do use unseen names
    assert len(train_names & seen_words) > 500  # many pseudo-names in training
    assert any(n[0] in "AEIOU" for n in train_names & seen_words)


# -- well-formedness -------------------------------------------------------------------------------
def test_every_pair_is_well_formed(corpus: dict[str, list[Pair]]) -> None:
    for pairs in corpus.values():
        for p in pairs:
            assert p.en[0].isupper() and p.fr[0].isupper(), p
            question = p.en.endswith("?")
            assert p.en.endswith("?" if question else ".") and not p.en.endswith(" ?")
            assert p.fr.endswith(" ?" if question else "."), p
            assert not p.fr.endswith(" ."), p
            assert p.fr.startswith("Est-ce qu") == question, p
            for text in (p.en, p.fr):
                assert "  " not in text and "\t" not in text and " ," not in text
            assert "n't" not in p.en
            assert 2 <= len(p.en.split()) <= 24, p.en


def test_sentence_lengths(corpus: dict[str, list[Pair]]) -> None:
    lengths = [len(p.en.split()) for p in corpus["train"]]
    assert max(lengths) <= 24
    assert sum(3 <= n <= 14 for n in lengths) > 0.95 * len(lengths)


def test_no_missed_elision_or_contraction(train_fr: list[str]) -> None:
    missed = re.compile(rf"(?<![\w-])(le|la|de|que|ne|je|ce|ma|sa) (?!onze)[{VOWEL}]", re.IGNORECASE)
    h_muet = re.compile(r"(?<![\w-])(le|la|de|que|ce) (homme|hôtel|heure|histoire|hiver|hôpital|horloge)")
    for fr in train_fr:
        assert not missed.search(fr), fr
        assert not h_muet.search(fr), fr
        assert not re.search(r"(?<![\w-])(à|de) (le|les) ", fr), fr
        assert not re.search(r"(?<![\w-])cet [bcdfgjklmnpqrstvwxz]", fr), fr


# The surface check for each phenomenon, independent of the tag machinery.
SURFACE = {
    "elision": r"(?i)(?<![\w-])(l|d|j|n|qu)'",
    "contraction_au": r"(?<![\w-])au ",
    "contraction_aux": r"(?<![\w-])aux ",
    "contraction_du": r"(?<![\w-])du ",
    "contraction_des": r"(?<![\w-])des ",
    "demonstrative_cet": r"(?<![\w-])[Cc]et ",
    "possessive_mon_feminine": r"(?<![\w-])[MmSs]on ("
    + "|".join(n.fr for n in load_lexicon().nouns if n.feminine and n.vowel)
    + r")(?![\w-])",
    "liaison_adjective": r"(?<![\w-])(bel|nouvel|vieil) ",
    "negation": r"(?<![\w-])n(e |')\S+ pas\b",
    "negation_de": r"\bpas d(e |')",
    "question": r"^Est-ce qu(e |').* \?$",
    "number_feminine": r"(?i)(^|[ '-])une ",
    "indefinite_de_adjective": r"(?<![\w-])de (grands|grandes|petits|petites|beaux|belles|vieux|vieilles|"
    r"nouveaux|nouvelles|bons|bonnes|jolis|jolies|mauvais|mauvaises|gros|grosses|"
    r"longs|longues) ",
    "generic_plural_definite": r"(?<![\w-])(aim|préfèr|préfér|détest)\w* (pas )?les ",
    "partitive": r"(?<![\w-])(du |de la |de l')",
    "coordination": r" et ",
    "preposition_dans": r"(?<![\w-])dans ",
    "preposition_avec": r"(?<![\w-])avec ",
}


@pytest.mark.parametrize("tag", sorted(SURFACE))
def test_phenomenon_present_by_tag_and_surface(corpus: dict[str, list[Pair]], tag: str) -> None:
    pattern = re.compile(SURFACE[tag])
    tagged = [p for p in corpus["train"] if tag in p.tags]
    assert len(tagged) >= 5, tag
    matching = [p for p in tagged if pattern.search(p.fr)]
    # The surface form can also occur for other reasons ("des" after venir de), but every tagged
    # pair must show it.
    assert len(matching) == len(tagged), [p.fr for p in tagged if not pattern.search(p.fr)][:3]


def test_other_phenomena_present(corpus: dict[str, list[Pair]]) -> None:
    tags = {tag for p in corpus["train"] for tag in p.tags}
    required = {
        "preposed_adjective",
        "postposed_adjective",
        "predicative_adjective",
        "demonstrative",
        "possessive",
        "number",
        "name",
        "pseudo_name",
        "city",
        "spelling_change",
        "irregular_verb",
        "preposition_a",
        "preposition_de",
        "generic_mass_definite",
        "coordination_subject",
        "coordination_object",
        "coordination_clause",
        "mixed_gender_agreement",
        "irregular_plural",
        "h_muet",
        "phrasal_verb",
    }
    assert required <= tags, required - tags
    text = "\n".join(p.fr for p in corpus["train"])
    for needle in ("quatre-vingt", " et un", "Est-ce qu'", " ?", "l'", "d'", "j'", "n'", "qu'"):
        assert needle in text, needle


def test_predicative_agreement(corpus: dict[str, list[Pair]]) -> None:
    """A feminine-only plural adjective form after "sont" needs a feminine plural noun subject."""
    lex = load_lexicon()
    fem_pl = {a.forms[3] for a in lex.adjectives if a.forms[3] != a.forms[2]}
    masc_pl = {a.forms[2] for a in lex.adjectives if a.forms[3] != a.forms[2]}
    by_plural = {n.fr_pl: n for n in lex.nouns}
    checked = 0
    for p in corpus["train"]:
        match = re.match(r"^(?:Les|Ces|Mes|Vos|Ses|Nos|Leurs) (\S+) (?:ne )?sont (?:pas )?(\S+)\.$", p.fr)
        if match and match.group(1) in by_plural and match.group(2) in fem_pl | masc_pl:
            checked += 1
            assert (match.group(2) in fem_pl) == by_plural[match.group(1)].feminine, p.fr
    assert checked > 10
