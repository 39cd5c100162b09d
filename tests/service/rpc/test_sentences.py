"""service.rpc.sentences: a text's sentences by its language's rules, and its spacing kept exactly."""

from __future__ import annotations

import pytest

from service.rpc import sentences
from service.rpc.sentences import Split, split_sentences, whole

PARAGRAPH = (
    "I love cats. The old man gives the red book to the child.  We see a small dog.\n"
    "The woman reads a new book. The children eat bread. We see the big house."
)


def test_a_paragraph_is_its_sentences_and_the_spacing_between_them() -> None:
    split = split_sentences(PARAGRAPH, "en")

    assert split.sentences == (
        "I love cats.",
        "The old man gives the red book to the child.",
        "We see a small dog.",
        "The woman reads a new book.",
        "The children eat bread.",
        "We see the big house.",
    )
    assert split.gaps == ("", " ", "  ", "\n", " ", " ", "")
    assert split.join(split.sentences) == PARAGRAPH


@pytest.mark.parametrize(
    "text",
    [
        "  Leading and trailing spaces. Kept?  \n",
        "Line one.\r\nLine two.\n\n\n\tIndented after blank lines.",
        "No final stop",
        "Café ☕. Über 😀 alles!\u00a0Next one.\u3000Last.",
        "I love cats.",
        "   ",
    ],
)
def test_joining_the_sentences_back_gives_the_text_exactly(text: str) -> None:
    split = split_sentences(text, "en")
    assert split.join(split.sentences) == text
    assert len(split.gaps) == len(split.sentences) + 1
    if text.strip():
        assert all(s == s.strip() and s for s in split.sentences)
        assert all(not gap.strip() for gap in split.gaps)


def test_a_line_break_ends_a_sentence_and_a_sentence_alone_is_kept_whole() -> None:
    assert split_sentences("A heading\nThe first line of text", "en").sentences == (
        "A heading",
        "The first line of text",
    )
    assert split_sentences("I love cats.", "en") == Split(("I love cats.",), ("", ""))
    assert split_sentences(" I love cats. ", "en") == Split(("I love cats.",), (" ", " "))


def test_the_rules_know_abbreviations_and_numbers() -> None:
    text = "Mr. Smith sees the U.S. flag. The price is 3.50 euros. It is 5 p.m. now."
    assert split_sentences(text, "en").sentences == (
        "Mr. Smith sees the U.S. flag.",
        "The price is 3.50 euros.",
        "It is 5 p.m. now.",
    )


def test_join_puts_the_translations_in_place_of_the_sentences() -> None:
    split = split_sentences(" I love cats.\n\nWe see a dog. ", "en")
    assert split.join(["J'aime les chats.", "Nous voyons un chien."]) == (
        " J'aime les chats.\n\nNous voyons un chien. "
    )
    with pytest.raises(ValueError, match="1 parts for 2 sentences"):
        split.join(["J'aime les chats."])


def test_whole_keeps_the_text_as_one_sentence() -> None:
    assert whole(" I love cats. We see a dog.\n") == Split((" I love cats. We see a dog.\n",), ("", ""))


def test_segments_that_do_not_tile_the_text_fall_back_to_its_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spacing is rebuilt from the splitter's offsets: offsets that skip or overlap text would
    lose or repeat some, so they are not trusted."""
    overlapping = [{"start_index": 0, "end_index": 8}, {"start_index": 5, "end_index": 20}]
    monkeypatch.setattr(sentences.sentencex, "get_sentence_boundaries", lambda language, text: overlapping)
    text = "One. Two. Three.\nFour."
    split = split_sentences(text, "en")
    assert split.sentences == ("One. Two. Three.", "Four.") and split.join(split.sentences) == text
