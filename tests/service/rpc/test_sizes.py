"""service.rpc.sizes, and the requests it refuses: what cannot fit is refused from lengths alone,
before any splitting or tokenising, and nothing that fits is refused."""

from __future__ import annotations

import random
import sys

import pytest

from export.translate import DEFAULT_MODEL_DIR
from service.api.translator.v1 import translator_pb2 as pb
from service.modeldir.manifest import Languages
from service.modeldir.tokenizer import Tokenizer
from service.rpc.attend import attend_pairs
from service.rpc.requests import InvalidRequestError, RequestLimits, check_sizes, translate_jobs
from service.rpc.sentences import split_sentences
from service.rpc.sizes import least_split_tokens, texts_overrun, visible_chars

LIMITS = RequestLimits(  # the defaults of the server and the default model
    max_texts_per_request=64,
    max_sentences_per_request=256,
    max_beam_size=8,
    max_source_tokens=128,
    max_output_tokens=128,
    vocab_size=2000,
)
WHITESPACE = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(DEFAULT_MODEL_DIR / "tokenizer.json")


@pytest.fixture
def tokenised(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the texts the real tokenizer is given while the test runs."""
    seen: list[int] = []
    encode_batch = tokenizer.encode_batch

    def counted(texts: list[str]) -> list[list[int]]:
        seen.extend(map(len, texts))
        return encode_batch(texts)

    monkeypatch.setattr(tokenizer, "encode_batch", counted)
    return seen


def test_visible_chars_is_exact_for_ascii_and_never_more_than_the_non_whitespace() -> None:
    assert visible_chars(" a\tb\nc\r\x0b\x0c\x1c\x1d\x1e\x1f d ") == 4
    rng = random.Random(3)
    alphabet = [*WHITESPACE, "a", "é", "—", "’", "\u2028", "漢", "🐱"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert visible_chars(text) <= sum(not c.isspace() for c in text), repr(text)
    assert visible_chars("".join(WHITESPACE) + "x") == 1  # every whitespace character found


def test_the_split_bound_is_never_more_than_the_sentences_tokens(
    tokenizer: Tokenizer, corpus_splits: dict[str, list[tuple[str, str]]]
) -> None:
    en = [en for en, _ in corpus_splits["test"][:400]]
    paragraphs = [
        " ".join(en[i : i + 5]) + "\n\n  " + "\u3000".join(en[i + 5 : i + 8]) for i in range(0, 400, 8)
    ]
    for text in paragraphs:
        tokens = sum(len(tokenizer.encode(s)) for s in split_sentences(text, "en").sentences)
        assert least_split_tokens(tokenizer, text) <= tokens


def test_a_huge_text_is_refused_naming_the_limits_without_splitting_or_tokenising(
    tokenizer: Tokenizer, tokenised: list[int]
) -> None:
    text = "a" * 4_000_000
    with pytest.raises(InvalidRequestError) as err:
        translate_jobs([text], pb.TranslateOptions(), tokenizer, LIMITS, language="en", new_seed=int)
    assert str(err.value) == (
        "text 0: 4,000,000 characters besides whitespace need at least 285,715 tokens (a token of this "
        "model stands for at most 14 characters of ASCII text, 56 of other text), more than the 32,512 "
        "one request may hold: at most 256 sentences (--max-sentences-per-request) of 127 tokens each "
        "(the model's limit of 128, end token included); send less text per call"
    )
    with pytest.raises(InvalidRequestError, match=r"^text 1: input is 4,000,000 characters.*limit of 128$"):
        check_sizes(["Hi.", text], pb.TranslateOptions(no_sentence_split=True), tokenizer, LIMITS)
    with pytest.raises(InvalidRequestError, match=r"^target_prefix is 4,000,000 characters.* at most 128"):
        check_sizes(["Hi."], pb.TranslateOptions(target_prefix=text), tokenizer, LIMITS)
    assert tokenised == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "a" * 4_000_000}, r"^source: 4,000,000 characters besides whitespace .* 32,512"),
        ({"source": "a" * 4_000_000, "no_sentence_split": True}, r"^source: input is 4,000,000 characters"),
        (
            {"source": "Hi.", "target": "a" * 4_000_000},
            r"^target: 4,000,000 characters .* the 32,512 a target of at most 256",
        ),
        (
            {"source": "Hi. Go.", "target": "a " * 10_000},
            r"^target: 10,000 characters besides whitespace .* the 254 a target of at most 2 sentences",
        ),
    ],
)
def test_a_huge_attend_source_or_target_is_refused_without_tokenising(
    tokenizer: Tokenizer, tokenised: list[int], fields: dict, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        attend_pairs(pb.AttendRequest(**fields), tokenizer, LIMITS, Languages("en", "fr"))
    assert all(n < 10 for n in tokenised)  # at most the short source was tokenised


def test_whitespace_between_sentences_costs_nothing_and_a_request_at_the_bound_is_served(
    tokenizer: Tokenizer,
) -> None:
    spaced = "I love cats." + " " * 1_000_000 + "We see a dog."  # spacing is not tokenised
    (job,) = translate_jobs([spaced], pb.TranslateOptions(), tokenizer, LIMITS, language="en", new_seed=int)
    assert len(job.sentences) == 2
    # 256 sentences of 127 one-character-a-piece tokens: far beyond the bound's characters, served
    sentence = " ".join(["a"] * 63) + " b."
    room = LIMITS.max_sentences_per_request * (LIMITS.max_source_tokens - 1)
    assert texts_overrun([f"{sentence}\n" * 256], tokenizer, room) is None
