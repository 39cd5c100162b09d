"""service.rpc.requests: every bad input of a Translate request is refused with the limit named."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from export.translate import DEFAULT_MODEL_DIR
from service.api.translator.v1 import translator_pb2 as pb
from service.modeldir.manifest import Decoding, Languages
from service.modeldir.tokenizer import Tokenizer
from service.rpc.requests import (
    InvalidRequestError,
    RequestLimits,
    SchedulerShare,
    SentenceJob,
    TextJob,
    UndecodableRequest,
    decoded,
    request_decoder,
    request_languages,
    translate_jobs,
)

LIMITS = RequestLimits(
    max_texts_per_request=4,
    max_sentences_per_request=6,
    max_beam_size=8,
    max_source_tokens=128,
    max_output_tokens=128,
    vocab_size=2000,
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
        language="en",
        streaming=streaming,
        new_seed=lambda: next(seeds),
    )


def rows(text_jobs: list[TextJob]) -> list[SentenceJob]:
    """The sentence jobs of texts of one sentence each, in order."""
    assert all(len(j.sentences) == 1 for j in text_jobs)
    return [j.sentences[0] for j in text_jobs]


def test_defaults_are_greedy_with_a_per_text_length_limit(tokenizer: Tokenizer) -> None:
    texts = ["I love cats.", "The old man gives the red book to the child."]
    short, long = rows(jobs(tokenizer, texts))
    assert short.source_ids[-1] == tokenizer.special.eos
    assert short.options.beam_size == 1 and short.options.sampling is None
    assert jobs(tokenizer, texts)[0].seed is None
    assert short.options.max_output_tokens == 2 * len(short.source_ids) + 10
    assert long.options.max_output_tokens == 2 * len(long.source_ids) + 10
    assert short.options.never_ids == (tokenizer.special.pad, tokenizer.special.bos)


def test_beam_sampling_stopping_and_prefix_options(tokenizer: Tokenizer) -> None:
    (beam,) = rows(jobs(tokenizer, ["I see cats."], beam=pb.BeamSearch(), n_best=3))
    assert (beam.options.beam_size, beam.options.length_penalty, beam.options.n_best) == (4, 1.0, 3)
    (beam,) = rows(jobs(tokenizer, ["I see cats."], beam=pb.BeamSearch(beam_size=2, length_penalty=0.0)))
    assert (beam.options.beam_size, beam.options.length_penalty) == (2, 0.0)
    a, b = jobs(tokenizer, ["I see cats.", "I see dogs."], sampling=pb.Sampling(temperature=0.7, top_k=5))
    sampling = a.sentences[0].options.sampling
    assert sampling is not None and sampling.top_p == 1.0
    assert (a.seed, b.seed) == (100, 101)  # the server picks a seed per text and reports it
    (seeded,) = jobs(tokenizer, ["I see cats."], sampling=pb.Sampling(seed=7))
    sampling = seeded.sentences[0].options.sampling
    assert seeded.seed == 7 and sampling is not None and sampling.seed == 7
    stopping = pb.StoppingCriteria(max_output_tokens=20, min_output_tokens=3)
    (stopped,) = rows(jobs(tokenizer, ["I see cats."], stopping=stopping, target_prefix="Je"))
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


# --- a text is its sentences: the limits hold per sentence ------------------------------------------

PARAGRAPH = "I see cats.  We see a small dog.\nThe old man gives the red book to the child."


def test_each_sentence_of_a_text_is_a_job_of_its_own(tokenizer: Tokenizer) -> None:
    (job,) = jobs(tokenizer, [PARAGRAPH], target_prefix="Je", sampling=pb.Sampling(seed=7))

    assert job.split.sentences == (
        "I see cats.",
        "We see a small dog.",
        "The old man gives the red book to the child.",
    )
    assert job.split.gaps == ("", "  ", "\n", "")
    for sentence, text in zip(job.sentences, job.split.sentences, strict=True):
        assert sentence.source_ids == (*tokenizer.encode(text), tokenizer.special.eos)
        assert sentence.options.max_output_tokens == 2 * len(sentence.source_ids) + 10
        assert sentence.options.sampling is not None and sentence.options.sampling.seed == 7
    # the translation starts with the prefix: its first sentence's does
    assert [s.options.forced_prefix for s in job.sentences] == [tuple(tokenizer.encode("Je")), (), ()]
    assert job.seed == 7


def test_no_sentence_split_keeps_a_text_whole(tokenizer: Tokenizer) -> None:
    (job,) = jobs(tokenizer, [PARAGRAPH], no_sentence_split=True)
    (sentence,) = job.sentences
    assert job.split.sentences == (PARAGRAPH,) and job.split.gaps == ("", "")
    assert sentence.source_ids == (*tokenizer.encode(PARAGRAPH), tokenizer.special.eos)


def test_a_text_longer_than_the_model_takes_is_accepted_when_its_sentences_fit(tokenizer: Tokenizer) -> None:
    text = " ".join([LONG] * 6)
    assert len(tokenizer.encode(text)) > LIMITS.max_source_tokens
    (job,) = jobs(tokenizer, [text])
    assert len(job.sentences) == 6
    with pytest.raises(InvalidRequestError, match=r"^text 0: input is .* tokens .*limit of 128$"):
        jobs(tokenizer, [text], no_sentence_split=True)


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (  # a single sentence over the model's limit, named in its text
            ["I see cats. " + "the cat " * 100 + "sleeps."],
            r"^text 0, sentence 2 of 2: input is \d+ tokens \(end token included\), longer than the limit "
            "of 128$",
        ),
        (
            ["I see cats. We see dogs. I see cats.", "We see dogs. I see cats. We see dogs. I see cats."],
            r"^7 sentences in one request, more than the limit of 6 \(--max-sentences-per-request\); send "
            "the texts over several calls$",
        ),
    ],
)
def test_sentences_over_the_limits_are_refused_naming_them(
    tokenizer: Tokenizer, texts: list[str], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        jobs(tokenizer, texts)


def test_a_default_length_that_does_not_fit_names_the_sentence(tokenizer: Tokenizer) -> None:
    with pytest.raises(
        InvalidRequestError,
        match=r"^text 0, sentence 2 of 2: beam_size 2 × max_output_tokens 60 \(not set: the default for "
        r"this sentence's \d\d source tokens",
    ):
        shared_jobs(tokenizer, [f"I see. {LONG}"], beam=pb.BeamSearch(beam_size=2))


def test_every_sentence_waits_in_the_queue(tokenizer: Tokenizer) -> None:
    assert SHARED.effective_max_sentences == 3
    assert len(shared_jobs(tokenizer, ["I see cats. We see dogs.", "I see."])) == 2
    with pytest.raises(
        InvalidRequestError,
        match=r"^4 sentences in one request, more than the 3 the server's request queue holds "
        r"\(--max-queue-size\): every sentence waits .*send at most 3 sentences per call$",
    ):
        shared_jobs(tokenizer, ["I see cats. We see dogs.", "I see. We see."])


# --- float fields: the documented inclusive bounds hold for the float32 the client sends ------------


def _round_trip(options: pb.TranslateOptions) -> pb.TranslateOptions:
    """The options as the server gets them: serialized, so every float field is a float32."""
    return pb.TranslateOptions.FromString(options.SerializeToString())


@pytest.mark.parametrize(
    "options",
    [
        {"sampling": pb.Sampling(temperature=0.01)},  # arrives as 0.0099999998
        {"sampling": pb.Sampling(temperature=10)},
        {"sampling": pb.Sampling(top_p=1.0)},
        {"sampling": pb.Sampling(top_p=1e-6)},
        {"sampling": pb.Sampling(temperature=0.01, top_p=1.0)},
        {"beam": pb.BeamSearch(length_penalty=0.0)},
        {"beam": pb.BeamSearch(length_penalty=2.0)},
    ],
)
def test_float_fields_at_their_inclusive_bounds_are_accepted(tokenizer: Tokenizer, options: dict) -> None:
    sent = _round_trip(pb.TranslateOptions(**options))
    (job,) = rows(translate_jobs(["I see cats."], sent, tokenizer, LIMITS, language="en", new_seed=lambda: 1))
    if sent.HasField("sampling"):
        assert job.options.sampling is not None
        assert job.options.sampling.temperature == pytest.approx(sent.sampling.temperature or 1.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sampling": pb.Sampling(temperature=0.0099)}, "temperature 0.0099 must be between 0.01 and 10"),
        ({"sampling": pb.Sampling(temperature=10.001)}, "temperature 10.001 must be between 0.01 and 10"),
        ({"sampling": pb.Sampling(top_p=1.0000001)}, r"top_p 1 must be in \(0, 1\]"),  # the next float32
        ({"beam": pb.BeamSearch(length_penalty=-0.0001)}, "length_penalty -0.0001 must be between 0 and 2"),
        ({"beam": pb.BeamSearch(length_penalty=2.0001)}, "length_penalty 2.0001 must be between 0 and 2"),
        ({"sampling": pb.Sampling(temperature=float("nan"))}, "temperature nan must be between"),
    ],
)
def test_float_fields_just_outside_their_bounds_are_refused(
    tokenizer: Tokenizer, options: dict, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        translate_jobs(
            ["I see cats."],
            _round_trip(pb.TranslateOptions(**options)),
            tokenizer,
            LIMITS,
            language="en",
            new_seed=lambda: 1,
        )


# --- what the scheduler holds bounds a request as surely as the model --------------------------------

# one of 2 instances: 2 rows, 60 KV-cache slots; a queue of 3 over the process
SHARE = SchedulerShare(
    max_sequences=2, max_kv_cache_tokens=60, queue_capacity=3, split="2 instances split (--instances)"
)
SHARED = replace(LIMITS, max_texts_per_request=64, scheduler=SHARE)
LONG = "The old man gives the red book to the small child, and the young woman sees the big dog in the park."


def shared_jobs(tokenizer: Tokenizer, texts: list[str], **options: object):
    return translate_jobs(
        texts, pb.TranslateOptions(**options), tokenizer, SHARED, language="en", new_seed=lambda: 1
    )


def test_the_effective_limits_are_the_tighter_of_settings_model_and_scheduler() -> None:
    assert (
        SHARED.effective_max_texts,
        SHARED.effective_max_beam_size,
        SHARED.effective_max_output_tokens,
    ) == (
        3,
        2,
        60,
    )
    assert (
        LIMITS.effective_max_texts,
        LIMITS.effective_max_beam_size,
        LIMITS.effective_max_output_tokens,
    ) == (
        4,
        8,
        128,
    )


def test_requests_within_the_effective_limits_are_accepted(tokenizer: Tokenizer) -> None:
    assert len(shared_jobs(tokenizer, ["I see cats."] * 3)) == 3
    stopping = pb.StoppingCriteria(max_output_tokens=30)
    (beam,) = rows(shared_jobs(tokenizer, [LONG], beam=pb.BeamSearch(beam_size=2), stopping=stopping))
    assert (beam.options.beam_size, beam.options.max_output_tokens) == (2, 30)
    (greedy,) = rows(shared_jobs(tokenizer, [LONG]))  # its default, 2 × source + 10, is capped at 60
    assert len(greedy.source_ids) * 2 + 10 > 60 and greedy.options.max_output_tokens == 60
    (full,) = rows(shared_jobs(tokenizer, [LONG], stopping=pb.StoppingCriteria(max_output_tokens=60)))
    assert full.options.max_output_tokens == 60


@pytest.mark.parametrize(
    ("texts", "options", "message"),
    [
        (
            ["I see."] * 4,
            {},
            r"^4 texts in one request, more than the 3 the server's request queue holds "
            r"\(--max-queue-size\).*send at most 3 texts per call$",
        ),
        (
            ["I see."],
            {"beam": pb.BeamSearch(beam_size=3)},
            r"^beam_size 3 is over the limit of 2: .*one scheduler instance's share of --max-sequences, "
            r"which 2 instances split \(--instances\)",
        ),
        (
            ["I see."],
            {"beam": pb.BeamSearch()},
            r"^beam_size 4 \(not set: the default\) is over the limit of 2",
        ),
        (
            ["I see."],
            {"stopping": pb.StoppingCriteria(max_output_tokens=61)},
            r"^max_output_tokens 61 needs 61 KV-cache slots \(one per token\), more than the 60 one "
            r"request may hold \(one scheduler instance's share of --max-kv-cache-tokens.*at most 60$",
        ),
        (
            ["I see."],
            {"beam": pb.BeamSearch(beam_size=2), "stopping": pb.StoppingCriteria(max_output_tokens=31)},
            r"^beam_size 2 × max_output_tokens 31 needs 62 KV-cache slots.*at most 30 for beam_size 2, "
            "or ask for a smaller beam_size$",
        ),
        (  # the default the client never set is named as such, with how to lower it
            ["I see.", LONG],
            {"beam": pb.BeamSearch(beam_size=2)},
            r"^text 1: beam_size 2 × max_output_tokens 60 \(not set: the default for this text's \d\d "
            r"source tokens, 2 × \d\d \+ 10, at most 60\) needs 120 KV-cache slots.*set "
            "stopping.max_output_tokens to at most 30 for beam_size 2",
        ),
    ],
)
def test_requests_beyond_what_the_scheduler_holds_are_refused_up_front(
    tokenizer: Tokenizer, texts: list[str], options: dict, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        shared_jobs(tokenizer, texts, **options)


# --- messages name the defaults the client never set ------------------------------------------------

NOT_SET = (
    r"max_output_tokens 20 \(not set: the default for this text's 5 source tokens, 2 × 5 \+ 10, at most 128\)"
)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"target_prefix": "le chat " * 20},
            rf"^text 0: target_prefix is \d+ tokens and {NOT_SET} leaves no room after it; set "
            r"stopping.max_output_tokens between \d+ and 128 \(the most that may be asked for\)$",
        ),
        (
            {"target_prefix": "le chat " * 70},
            rf"^text 0: target_prefix is \d+ tokens and {NOT_SET} leaves no room after it; "
            r"max_output_tokens may be at most 128 \(the end token included\), so target_prefix must be "
            "shorter$",
        ),
        (
            {"stopping": pb.StoppingCriteria(min_output_tokens=127)},
            rf"^text 0: min_output_tokens 127 must be below {NOT_SET}; set stopping.max_output_tokens "
            "between 128 and 128",
        ),
        (
            {"stopping": pb.StoppingCriteria(min_output_tokens=128)},
            rf"^text 0: min_output_tokens 128 must be below {NOT_SET}; max_output_tokens may be at most "
            r"128 \(the end token included\), so min_output_tokens must be lower$",
        ),
        (  # set by the client: the whole request's fault, no text named, no default explained
            {"stopping": pb.StoppingCriteria(max_output_tokens=5, min_output_tokens=6)},
            r"^min_output_tokens 6 must be below max_output_tokens 5; set stopping.max_output_tokens "
            "between 7 and 128",
        ),
    ],
)
def test_messages_say_when_max_output_tokens_is_the_default(
    tokenizer: Tokenizer, options: dict, message: str
) -> None:
    assert len(tokenizer.encode("I see.")) + 1 == 5
    with pytest.raises(InvalidRequestError, match=message):
        jobs(tokenizer, ["I see."], **options)


# --- bytes that are not a request ------------------------------------------------------------------


def test_undecodable_bytes_become_an_invalid_request_naming_the_type_and_the_fault() -> None:
    decode = request_decoder(pb.TranslateRequest)
    request = pb.TranslateRequest(texts=["I see."])
    assert decoded(decode(request.SerializeToString())) == request
    for data, fault in (
        (b"\x0a\x03\xff\xfe\x41", "String field had bad UTF-8"),
        (b"\xff\xff\xff\xff", "corrupt"),
    ):
        bad = decode(data)
        assert isinstance(bad, UndecodableRequest)
        with pytest.raises(
            InvalidRequestError,
            match=f"^the request is not a valid translator.v1.TranslateRequest: .*{fault}",
        ):
            decoded(bad)


# --- languages -------------------------------------------------------------------------------------


class _Multilingual(Tokenizer):
    """A tokenizer with language tokens (its text side is the default model's)."""

    def __init__(self, inner: Tokenizer, languages: dict[str, int]) -> None:
        self._inner, self.special, self.files, self.languages = inner, inner.special, inner.files, languages

    @property
    def vocab_size(self) -> int:
        return self._inner.vocab_size

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._inner.encode_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self._inner.decode(ids)

    def id_to_token(self, token_id: int) -> str:
        return self._inner.id_to_token(token_id)


def test_languages_of_a_bilingual_model(tokenizer: Tokenizer) -> None:
    limits = replace(LIMITS, languages=Languages("en", "fr"))
    for source, target in (("", ""), ("en", ""), ("", "fr"), ("en", "fr")):
        assert request_languages(source, target, tokenizer, limits) == (None, ())
    for source, target, asked in (("de", "", "de → fr"), ("", "es", "en → es"), ("fr", "en", "fr → en")):
        with pytest.raises(InvalidRequestError, match=f"translates en → fr only, not {asked}"):
            request_languages(source, target, tokenizer, limits)


def test_languages_of_a_multilingual_model(tokenizer: Tokenizer) -> None:
    codes = {f"l{i:02d}_Xxxx": 1900 + i for i in range(20)}
    multi = _Multilingual(tokenizer, codes)
    limits = replace(LIMITS, languages=Languages("l00_Xxxx", ""))
    assert request_languages("", "l05_Xxxx", multi, limits) == ("l00_Xxxx", (1905,))
    assert request_languages("l03_Xxxx", "l05_Xxxx", multi, limits) == ("l03_Xxxx", (1905,))
    with pytest.raises(InvalidRequestError, match=r"target_language is required .*l11_Xxxx and 8 more"):
        request_languages("l03_Xxxx", "", multi, limits)
    with pytest.raises(InvalidRequestError, match=r"source_language 'zz' is not one of"):
        request_languages("zz", "l05_Xxxx", multi, limits)
    with pytest.raises(InvalidRequestError) as err:
        request_languages("", "y" * 10_000, multi, limits)
    assert len(str(err.value)) < 400  # what a client sent is echoed cut short
    (job,) = translate_jobs(
        ["I love cats."],
        pb.TranslateOptions(target_language="l07_Xxxx"),
        multi,
        replace(limits, decoding=Decoding(never_ids=(), multilingual=True)),
        language="en",
        new_seed=int,
    )
    (sentence,) = job.sentences
    assert sentence.options.forced_start == (1907,) and sentence.options.never_ids == ()
    assert sentence.source_ids[0] == 1900  # the source language's token first


def test_a_model_default_beam_and_length_limit_apply_when_the_request_sets_none(tokenizer: Tokenizer) -> None:
    pad_and_start = (tokenizer.special.pad, tokenizer.special.bos)
    decoding = Decoding(never_ids=pad_and_start, default_beam_size=4, max_output_tokens=12)
    limits = replace(LIMITS, decoding=decoding)
    seeds = itertools.count()

    def job(streaming: bool = False, **options: object):
        (text,) = translate_jobs(
            ["I love cats."],
            pb.TranslateOptions(**options),
            tokenizer,
            limits,
            language="en",
            streaming=streaming,
            new_seed=lambda: next(seeds),
        )
        return text.sentences[0].options

    assert (job().beam_size, job().max_output_tokens) == (4, 12)  # 2 × source + 10 capped at 12
    assert job(streaming=True).beam_size == 1  # a stream decodes one hypothesis
    assert job(greedy=pb.Greedy()).beam_size == 1
    assert job(stopping=pb.StoppingCriteria(max_output_tokens=40)).max_output_tokens == 40
