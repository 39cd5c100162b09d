"""service.rpc.responses: a text of several sentences comes back as one Translation, by the proto's rules."""

from __future__ import annotations

import pytest

from export.translate import DEFAULT_MODEL_DIR
from service.api.translator.v1 import translator_pb2 as pb
from service.decoding import Hypothesis, SearchOptions
from service.modeldir.tokenizer import Tokenizer
from service.rpc.requests import SentenceJob, TextJob
from service.rpc.responses import translation_message
from service.rpc.sentences import split_sentences
from service.scheduler import FinishReason, Generation, Timings


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(DEFAULT_MODEL_DIR / "tokenizer.json")


def hypothesis(tokenizer: Tokenizer, text: str, score: float, finished: bool = True) -> Hypothesis:
    ids = tuple(tokenizer.encode(text))
    count = len(ids) + int(finished)
    return Hypothesis(ids, score, finished, (score / count,) * count)


def generation(hypotheses: list[Hypothesis], timings: Timings, input_tokens: int = 5) -> Generation:
    best = hypotheses[0]
    reason = FinishReason.END_OF_SEQUENCE if best.finished else FinishReason.LENGTH
    return Generation(tuple(hypotheses), reason, input_tokens, len(best.tokens), best.length, timings)


def text_job(tokenizer: Tokenizer, text: str, prefix: str = "", length_penalty: float = 1.0) -> TextJob:
    split = split_sentences(text, "en")
    forced = tuple(tokenizer.encode(prefix))
    sentences = tuple(
        SentenceJob((1, 2), SearchOptions(60, 2, 2, length_penalty, 2, forced_prefix=() if j else forced))
        for j in range(len(split.sentences))
    )
    return TextJob(text, split, sentences, seed=None)


def test_hypothesis_k_of_a_text_joins_hypothesis_k_of_each_sentence(tokenizer: Tokenizer) -> None:
    job = text_job(tokenizer, " I love cats.\n\nWe see a dog. ", prefix="J'aime", length_penalty=0.5)
    first = [hypothesis(tokenizer, "J'aime les chats.", -1.0), hypothesis(tokenizer, "J'aime le chat.", -3.0)]
    # the second sentence: its best cut at the length limit, and no second hypothesis
    second = [hypothesis(tokenizer, "Nous voyons un", -2.0, finished=False)]
    gens = [generation(first, Timings(0.01, 0.02, 0.5), 6), generation(second, Timings(0.03, 0.05, 0.2), 7)]
    options = pb.TranslateOptions(return_tokens=True, return_timings=True)

    t = translation_message(job, gens, tokenizer, options, total_s=1.0)

    assert t.text == " J'aime les chats.\n\nNous voyons un " == t.hypotheses[0].text
    assert len(t.hypotheses) == 1  # as many as the sentence with the fewest
    (best,) = t.hypotheses
    length = first[0].length + second[0].length
    assert (best.score, t.output_tokens, t.input_tokens) == (-3.0, length, 13)
    assert best.normalized_score == pytest.approx(-3.0 / length**0.5)
    # cut anywhere: the text is cut
    assert best.finish_reason == t.finish_reason == pb.FINISH_REASON_LENGTH
    # every sentence's tokens in turn, the first's end token between them; the prefix forced once
    assert len(best.tokens) == t.output_tokens
    assert [tok.special for tok in best.tokens].count(True) == 1 and best.tokens[first[0].length - 1].special
    assert [tok.forced for tok in best.tokens] == [i < len(tokenizer.encode("J'aime")) for i in range(length)]
    assert sum(tok.logprob for tok in best.tokens) == pytest.approx(best.score)
    # queued until the first sentence joined; the first sentence's first token; decoding from there
    # to the last end
    timings = t.timings
    assert (timings.queue_seconds, timings.time_to_first_token_seconds) == (0.01, 0.02)
    assert (timings.decode_seconds, timings.total_seconds) == (pytest.approx(0.51 - 0.01), 1.0)


def test_a_text_of_one_sentence_is_that_sentences_translation(tokenizer: Tokenizer) -> None:
    job = text_job(tokenizer, "I love cats.")
    hyps = [hypothesis(tokenizer, "J'aime les chats.", -1.0), hypothesis(tokenizer, "J'aime le chat.", -3.0)]
    gens = [generation(hyps, Timings(0.01, 0.02, 0.5))]
    t = translation_message(job, gens, tokenizer, pb.TranslateOptions(), 1.0)

    assert [h.text for h in t.hypotheses] == ["J'aime les chats.", "J'aime le chat."]
    assert [h.score for h in t.hypotheses] == [-1.0, -3.0]
    assert t.hypotheses[0].normalized_score == -1.0 / hyps[0].length
    assert t.finish_reason == pb.FINISH_REASON_END_OF_SEQUENCE and not t.HasField("timings")
