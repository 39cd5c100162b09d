"""A text as its sentences and the spacing around them, and the translations joined back.

A paragraph is translated sentence by sentence: the model was trained on sentences, and its
source limit is per sequence. `split_sentences` finds the sentences with sentencex (Wikimedia's
segmenter, the rules of the text's language) and keeps everything else as it was sent: the
whitespace before the first sentence, between two sentences and after the last are the `gaps`,
and `Split.join` puts the translations back between them, so that a text's newlines, double
spaces and indentation come back unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import sentencex


@dataclass(frozen=True)
class Split:
    """`text == gaps[0] + sentences[0] + gaps[1] + … + sentences[-1] + gaps[-1]`."""

    sentences: tuple[str, ...]  # at least one; none starts or ends with whitespace when split
    gaps: tuple[str, ...]  # len(sentences) + 1: the text around the sentences, whitespace when split

    def join(self, parts: Sequence[str]) -> str:
        """`parts` (one per sentence, e.g. their translations) in place of the sentences."""
        if len(parts) != len(self.sentences):
            raise ValueError(f"{len(parts)} parts for {len(self.sentences)} sentences")
        out = [self.gaps[0]]
        for part, gap in zip(parts, self.gaps[1:], strict=True):
            out += (part, gap)
        return "".join(out)


def whole(text: str) -> Split:
    """The text as one sentence, spacing included (no_sentence_split: as it was sent)."""
    return Split((text,), ("", ""))


def split_sentences(text: str, language: str) -> Split:
    """The sentences of `text` by the rules of `language` (an ISO code such as "en"; sentencex falls
    back to a related language's rules, or its default, for one it has none for).

    A line break always ends a sentence (a list, a heading, a verse), so that it stays where it
    was; a sentence wrapped over lines is translated line by line. A blank text is `whole(text)`.
    """
    spans = [span for start, end in _segments(text, language) for span in _sentences_in(text, start, end)]
    if not spans:
        return whole(text)
    gaps = [text[: spans[0][0]]]
    gaps += [text[end:start] for (_, end), (start, _) in itertools.pairwise(spans)]
    gaps.append(text[spans[-1][1] :])
    return Split(tuple(text[start:end] for start, end in spans), tuple(gaps))


def _segments(text: str, language: str) -> list[tuple[int, int]]:
    """sentencex's segments as (start, end) code-point offsets; one segment, the whole text, unless
    they tile it exactly (the spacing is rebuilt from the offsets, so it must lose nothing)."""
    segments = [(b["start_index"], b["end_index"]) for b in sentencex.get_sentence_boundaries(language, text)]
    ends = [0, *(end for _, end in segments)]
    if not segments or [start for start, _ in segments] != ends[:-1] or ends[-1] != len(text):
        return [(0, len(text))]
    return segments


def _sentences_in(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each line of text[start:end] without the whitespace around it; blank lines
    give none."""
    for line in text[start:end].splitlines(keepends=True):
        core = line.strip()
        if core:
            first = start + len(line) - len(line.lstrip())
            yield first, first + len(core)
        start += len(line)
