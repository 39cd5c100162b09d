"""service.rpc.attend: an Attend request's sentence pairs and maps, checked with the limit named."""

from __future__ import annotations

import pytest

from export.translate import DEFAULT_MODEL_DIR
from service.api.translator.v1 import translator_pb2 as pb
from service.modeldir.manifest import Languages, ModelShape
from service.modeldir.tokenizer import Tokenizer
from service.rpc.attend import attend_pairs, attend_selection
from service.rpc.requests import InvalidRequestError, RequestLimits

LIMITS = RequestLimits(
    max_texts_per_request=4,
    max_sentences_per_request=3,
    max_beam_size=8,
    max_source_tokens=128,
    max_output_tokens=20,
    vocab_size=2000,
)
EN_FR = Languages(source="en", target="fr")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(DEFAULT_MODEL_DIR / "tokenizer.json")


def pairs(tokenizer: Tokenizer, **fields: object):
    return attend_pairs(pb.AttendRequest(**fields), tokenizer, LIMITS, EN_FR)


# --- the sentence pairs -----------------------------------------------------------------------------


def test_a_source_of_several_sentences_is_attended_sentence_by_sentence(tokenizer: Tokenizer) -> None:
    p = pairs(tokenizer, source=" I love cats.\nWe see a dog. ")
    assert p.source.sentences == ("I love cats.", "We see a dog.") and p.target is None
    assert p.source_ids == tuple(
        (*tokenizer.encode(s), tokenizer.special.eos) for s in ("I love cats.", "We see a dog.")
    )
    given = pairs(
        tokenizer, source="I love cats. We see a dog.", target="J'aime les chats.  Nous voyons un chien."
    )
    assert given.target is not None and given.target.sentences == (
        "J'aime les chats.",
        "Nous voyons un chien.",
    )
    assert given.target_ids == tuple(tuple(tokenizer.encode(s)) for s in given.target.sentences)


def test_one_sentence_or_no_sentence_split_is_one_pair_with_the_target_whole(tokenizer: Tokenizer) -> None:
    p = pairs(tokenizer, source="I love cats.", target="J'aime les chats. Vraiment.")
    assert p.target is not None and p.target.sentences == ("J'aime les chats. Vraiment.",)
    whole = pairs(tokenizer, source="I love cats. We see a dog.", no_sentence_split=True, target="")
    assert whole.source.sentences == ("I love cats. We see a dog.",) and whole.target_ids == ((),)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "  "}, "^source is empty$"),
        (
            {"source": "I love cats. We see a dog.", "target": "J'aime les chats et les chiens."},
            r"^target has 1 sentences and source 2: .*give one target sentence for each \(or set "
            "no_sentence_split",
        ),
        (
            {"source": "I see. We see. You see. They see."},
            r"^4 sentences in one request, more than the limit of 3",
        ),
        (
            {"source": "I love cats. " + "the cat " * 70 + "sleeps."},
            r"^source, sentence 2 of 2: input is \d+ tokens \(end token included\), longer than the "
            "limit of 128$",
        ),
        (
            {"source": "I love cats.", "target": "le chat " * 20},
            r"^target is \d+ tokens \(end token included\), longer than the limit of 20$",
        ),
        (
            {"source": "I love cats. I see.", "target": "Oui. " + "le chat " * 20},
            r"^target, sentence 2 of 2 is \d+ tokens",
        ),
    ],
)
def test_pairs_beyond_the_limits_are_refused_naming_them(
    tokenizer: Tokenizer, fields: dict, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        pairs(tokenizer, **fields)


# --- Attend ------------------------------------------------------------------------------------------

# Encoder and decoder depths differ, so that a message naming the wrong stack's depth shows.
SHAPE = ModelShape(d_model=32, heads=4, encoder_layers=2, decoder_layers=3, vocab_size=100, max_positions=64)
CROSS, ENCODER, DECODER = (
    pb.ATTENTION_KIND_CROSS,
    pb.ATTENTION_KIND_ENCODER_SELF,
    pb.ATTENTION_KIND_DECODER_SELF,
)


def test_attend_selection_defaults_to_cross_attention_and_sorts_without_repeats() -> None:
    assert attend_selection(pb.AttendRequest(source="x"), SHAPE) == ([CROSS], [], [])
    request = pb.AttendRequest(source="x", kinds=[DECODER, ENCODER], layers=[1, 0, 1], heads=[3, 0, 3])
    assert attend_selection(request, SHAPE) == ([DECODER, ENCODER], [0, 1], [0, 3])
    at_the_limits = pb.AttendRequest(source="x", kinds=[CROSS, DECODER], layers=[2], heads=[3])
    assert attend_selection(at_the_limits, SHAPE) == ([CROSS, DECODER], [2], [3])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"kinds": [7]},
            r"^kinds: 7 is not an attention kind \(CROSS, ENCODER_SELF, DECODER_SELF\)$",
        ),
        (
            {"kinds": [pb.ATTENTION_KIND_UNSPECIFIED]},
            r"^kinds: 0 is not an attention kind \(CROSS, ENCODER_SELF, DECODER_SELF\)$",
        ),
        ({"kinds": [CROSS, CROSS]}, r"^kinds: each attention kind may be requested at most once$"),
        (
            {"layers": [3]},
            r"^layers: 3 is out of range; ATTENTION_KIND_CROSS has 3 layers \(0 to 2\)$",
        ),
        (
            {"kinds": [DECODER], "layers": [0, 3]},
            r"^layers: 3 is out of range; ATTENTION_KIND_DECODER_SELF has 3 layers \(0 to 2\)$",
        ),
        (
            {"kinds": [CROSS, ENCODER], "layers": [2]},
            r"^layers: 2 is out of range; ATTENTION_KIND_ENCODER_SELF has 2 layers \(0 to 1\)$",
        ),
        ({"heads": [1, 4]}, r"^heads: 4 is out of range; the model has 4 heads$"),
    ],
)
def test_attend_selection_refuses_what_the_model_does_not_have(fields: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        attend_selection(pb.AttendRequest(source="x", **fields), SHAPE)
