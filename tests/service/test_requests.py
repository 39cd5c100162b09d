"""service.requests: every bad input of a Translate request is refused with the limit named."""

from __future__ import annotations

import itertools

import pytest

from export.translate import DEFAULT_MODEL_DIR
from service.api.translator.v1 import translator_pb2 as pb
from service.requests import InvalidRequestError, RequestLimits, translate_jobs
from service.tokenizer import Tokenizer

LIMITS = RequestLimits(
    max_texts_per_request=4, max_beam_size=8, max_source_tokens=128, max_output_tokens=128, vocab_size=2000
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(DEFAULT_MODEL_DIR / "tokenizer.json")


def jobs(tokenizer: Tokenizer, texts: list[str], streaming: bool = False, **options: object):
    seeds = itertools.count(100)
    return translate_jobs(
        texts,
        pb.TranslateOptions(**options),
        tokenizer,
        LIMITS,
        streaming=streaming,
        new_seed=lambda: next(seeds),
    )


def test_defaults_are_greedy_with_a_per_text_length_limit(tokenizer: Tokenizer) -> None:
    short, long = jobs(tokenizer, ["I love cats.", "The old man gives the red book to the child."])
    assert short.source_ids[-1] == tokenizer.special.eos
    assert short.options.beam_size == 1 and short.options.sampling is None and short.seed is None
    assert short.options.max_output_tokens == 2 * len(short.source_ids) + 10
    assert long.options.max_output_tokens == 2 * len(long.source_ids) + 10
    assert short.options.never_ids == (tokenizer.special.pad, tokenizer.special.bos)


def test_beam_sampling_stopping_and_prefix_options(tokenizer: Tokenizer) -> None:
    (beam,) = jobs(tokenizer, ["I see cats."], beam=pb.BeamSearch(), n_best=3)
    assert (beam.options.beam_size, beam.options.length_penalty, beam.options.n_best) == (4, 1.0, 3)
    (beam,) = jobs(tokenizer, ["I see cats."], beam=pb.BeamSearch(beam_size=2, length_penalty=0.0))
    assert (beam.options.beam_size, beam.options.length_penalty) == (2, 0.0)
    a, b = jobs(tokenizer, ["I see cats.", "I see dogs."], sampling=pb.Sampling(temperature=0.7, top_k=5))
    assert a.options.sampling is not None and a.options.sampling.top_p == 1.0
    assert (a.seed, b.seed) == (100, 101)  # the server picks a seed per text and reports it
    (seeded,) = jobs(tokenizer, ["I see cats."], sampling=pb.Sampling(seed=7))
    assert seeded.seed == 7 and seeded.options.sampling is not None and seeded.options.sampling.seed == 7
    stopping = pb.StoppingCriteria(max_output_tokens=20, min_output_tokens=3)
    (stopped,) = jobs(tokenizer, ["I see cats."], stopping=stopping, target_prefix="Je")
    assert (stopped.options.max_output_tokens, stopped.options.min_output_tokens) == (20, 3)
    assert stopped.options.forced_prefix == tuple(tokenizer.encode("Je"))


@pytest.mark.parametrize(
    ("texts", "options", "streaming", "message"),
    [
        ([], {}, False, "no texts: send between 1 and 4"),
        (["a"] * 5, {}, False, "5 texts in one request, more than the limit of 4"),
        (["I love cats.", "  "], {}, False, "text 1 is empty"),
        (["the cat " * 100], {}, False, "text 0: input is .* tokens .*limit of 128"),
        (["I see."], {"beam": pb.BeamSearch(beam_size=9)}, False, "beam_size 9 is over the limit of 8"),
        (["I see."], {"beam": pb.BeamSearch(length_penalty=3)}, False, "between 0 and 2"),
        (["I see."], {"beam": pb.BeamSearch(beam_size=2), "n_best": 3}, False, "n_best 3 is more than"),
        (["I see."], {"n_best": 2}, False, "n_best 2 is more than the beam size 1"),
        (["I see."], {"sampling": pb.Sampling(top_p=1.5)}, False, r"top_p 1.5 must be in \(0, 1\]"),
        (["I see."], {"sampling": pb.Sampling(top_p=-0.1)}, False, r"top_p -0.1 must be in \(0, 1\]"),
        (["I see."], {"sampling": pb.Sampling(temperature=-1)}, False, "temperature -1 must be between"),
        (["I see."], {"sampling": pb.Sampling(top_k=5000)}, False, "top_k 5000 is over the vocabulary"),
        (
            ["I see."],
            {"stopping": pb.StoppingCriteria(max_output_tokens=5, min_output_tokens=6)},
            False,
            "min_output_tokens 6 must be below max_output_tokens 5",
        ),
        (
            ["I see."],
            {"stopping": pb.StoppingCriteria(max_output_tokens=500)},
            False,
            "max_output_tokens 500 is over the model's limit of 128",
        ),
        (["I see."], {"beam": pb.BeamSearch(beam_size=2)}, True, "TranslateStream decodes one hypothesis"),
        (
            ["I see."],
            {"stopping": pb.StoppingCriteria(max_output_tokens=2), "target_prefix": "Je vois le chat"},
            False,
            "leaves no room",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(
    tokenizer: Tokenizer, texts: list[str], options: dict, streaming: bool, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        jobs(tokenizer, texts, streaming, **options)
