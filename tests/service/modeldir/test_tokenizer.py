"""The runtime tokenizer with the committed tokenizer.json: exact round trips, no crash on anything."""

from __future__ import annotations

import json
import random
import sys
import unicodedata

import pytest

from export.checkpoint import TOKENIZER_FILE
from export.translate import DEFAULT_MODEL_DIR
from service.modeldir.tokenizer import NFC_MOST_JOINED, InputTooLongError, Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(DEFAULT_MODEL_DIR / TOKENIZER_FILE)


def test_special_ids_are_fixed(tokenizer: Tokenizer) -> None:
    assert (tokenizer.special.pad, tokenizer.special.bos, tokenizer.special.eos, tokenizer.special.unk) == (
        0,
        1,
        2,
        3,
    )


def test_round_trip_on_the_whole_test_set(
    tokenizer: Tokenizer, corpus_splits: dict[str, list[tuple[str, str]]]
) -> None:
    texts = [t for pair in corpus_splits["test"] for t in pair]
    failures = [t for t in texts if tokenizer.decode(tokenizer.encode(t)) != t]
    assert not failures, failures[:5]


@pytest.mark.parametrize(
    "text",
    [
        "Est-ce qu'Alice lit ?",
        "L'élève achète « trois » pommes ; où est-il ?",
        "Ça, c'est l'œuvre d'Ève — à Noël !",
        "I love 🐱 and 漢字 and Ωmega.",
        "  two  spaces and a\ttab ",
    ],
)
def test_round_trip_of_unseen_characters(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decomposed_accents_are_normalised(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("e\u0301le\u0300ve") == tokenizer.encode("élève")


def test_decode_drops_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Le chat.")
    sp = tokenizer.special
    assert tokenizer.decode([sp.bos, *ids, sp.eos, sp.pad]) == "Le chat."


@pytest.mark.parametrize("text", ["I love <s>dogs</s> cats.", "<pad> and <unk>", "</s>"])
def test_special_token_strings_in_a_text_are_plain_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    special = {tokenizer.special.pad, tokenizer.special.bos, tokenizer.special.eos, tokenizer.special.unk}
    assert not special & set(ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_source(text, 128)[-1] == tokenizer.special.eos  # the one end token: ours


def test_source_limit_is_named(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode_source("Le chat.", 16)[-1] == tokenizer.special.eos
    with pytest.raises(InputTooLongError, match="limit of 4"):
        tokenizer.encode_source("the cat sees the dog and the bird", 4)


def test_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_one_vocabulary_names_source_and_target_tokens_alike(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode_source("The old man reads.", 32)
    assert [tokenizer.source_token(i) for i in ids] == [tokenizer.id_to_token(i) for i in ids]
    assert tokenizer.source_vocab_size == tokenizer.vocab_size


# --- the length bound: never more tokens than a text takes, and no tokenising to refuse one ---------


def test_nfc_joins_at_most_nfc_most_joined_characters_into_one() -> None:
    # an NFC character comes from its canonical decomposition, one input character per piece at most
    longest = max(
        len(unicodedata.normalize("NFD", chr(c)))
        for c in range(sys.maxunicode + 1)
        if not 0xD800 <= c < 0xE000
    )
    assert longest == NFC_MOST_JOINED


def _awkward_texts(tokenizer: Tokenizer) -> list[str]:
    """Texts that pack many characters into few tokens, or that NFC shortens."""
    longest = max(range(tokenizer.vocab_size), key=lambda i: len(tokenizer.id_to_token(i)))
    as_text = tokenizer.decode([longest] * 9)  # " bibliothèque" nine times
    rng = random.Random(7)
    pieces = [
        "grandmothers",
        " ",
        "é",
        "e\u0301",
        "\u1100\u1161\u11a8",
        "\u03a9\u0314\u0342\u0345",
        "\u212a",
        "🐱",
    ]
    mixed = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    return [as_text, "a" * 5000, " " * 3000, "\u1100\u1161\u11a8" * 500, *mixed]


def test_the_length_bound_is_never_more_than_the_tokens(
    tokenizer: Tokenizer, corpus_splits: dict[str, list[tuple[str, str]]]
) -> None:
    texts = [t for pair in corpus_splits["test"][:300] for t in pair] + _awkward_texts(tokenizer)
    over = [t for t in texts if tokenizer.least_tokens(t) > len(tokenizer.encode(t))]
    assert not over, over[:3]
    assert tokenizer.max_chars_per_token(ascii=True) == 14  # "Ġbibliothèque": 14 bytes
    assert tokenizer.max_chars_per_token(ascii=False) == 14 * NFC_MOST_JOINED


def test_a_text_over_the_limit_is_refused_from_its_length_without_tokenising(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    encode_batch = tokenizer.encode_batch

    def counted(texts: list[str]) -> list[list[int]]:  # the real tokenizer, its inputs counted
        seen.extend(map(len, texts))
        return encode_batch(texts)

    monkeypatch.setattr(tokenizer, "encode_batch", counted)
    with pytest.raises(
        InputTooLongError, match=r"4,000,000 characters, at least 285,716 tokens .* limit of 128"
    ):
        tokenizer.encode_source("a" * 4_000_000, 128)
    assert seen == []
    # at the bound it tokenises and counts: 1,778 characters might be 127 tokens, these are more
    with pytest.raises(InputTooLongError, match=r"input is \d+ tokens"):
        tokenizer.encode_source("a " * 889, 128)
    assert seen == [1778]


def test_no_length_bound_where_the_normalizer_may_drop_characters(tmp_path) -> None:
    data = json.loads((DEFAULT_MODEL_DIR / TOKENIZER_FILE).read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "NFKC"}  # one the bound is not worked out for
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps(data), encoding="utf-8")
    other = Tokenizer.from_file(tmp_path / TOKENIZER_FILE)
    assert other.max_chars_per_token(ascii=True) is None and other.least_tokens("a" * 10_000) == 0
    with pytest.raises(InputTooLongError, match=r"input is \d+ tokens"):  # checked by counting its tokens
        other.encode_source("a " * 200, 128)
