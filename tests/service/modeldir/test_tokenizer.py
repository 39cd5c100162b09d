"""The runtime tokenizer with the committed tokenizer.json: exact round trips, no crash on anything."""

from __future__ import annotations

import pytest

from export.checkpoint import TOKENIZER_FILE
from export.translate import DEFAULT_MODEL_DIR
from service.modeldir.tokenizer import InputTooLongError, Tokenizer


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
