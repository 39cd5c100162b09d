"""How many tokens a request's texts need at least, known without splitting or tokenising them.

Splitting a text into sentences (sentencex, pure Python) and tokenising it take time in proportion
to its length: seconds for a few megabytes (docs/reliability.md). What cannot fit is refused first,
from lengths alone: one token stands for at most `Tokenizer.max_chars_per_token` characters, so a
text of n characters needs at least ceil(n / that) tokens, and a bound built on it never refuses a
text that would fit. A text still to be split is tokenised sentence by sentence and the spacing
between its sentences is not, so there only the characters that are not whitespace count.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.modeldir.tokenizer import Tokenizer

_ASCII_SPACES = bytes(c for c in range(128) if chr(c).isspace())
# How every other whitespace character (str.isspace, what the splitter strips) starts in UTF-8.
# b"\xe2\x80" starts U+2000–U+203F, quotes and dashes as well as spaces: counting them all as
# whitespace only lowers the bound.
_WIDE_SPACE_STARTS = (
    b"\xc2\x85",
    b"\xc2\xa0",
    b"\xe1\x9a\x80",
    b"\xe2\x80",
    b"\xe2\x81\x9f",
    b"\xe3\x80\x80",
)


def visible_chars(text: str) -> int:
    """At most the number of characters of `text` that are not whitespace (exactly that for ASCII
    text), counted at C speed: a few milliseconds for 4 MB."""
    data = text.encode("utf-8")
    spaces = len(data) - len(data.translate(None, _ASCII_SPACES))
    if not text.isascii():
        spaces += sum(data.count(start) for start in _WIDE_SPACE_STARTS)
    return max(0, len(text) - spaces)


def least_split_tokens(tokenizer: Tokenizer, text: str) -> int:
    """At least how many tokens the sentences of `text` take together, however it splits (0 when
    the tokenizer gives no bound)."""
    per = tokenizer.max_chars_per_token(ascii=text.isascii())
    return 0 if per is None else -(-visible_chars(text) // per)


def texts_overrun(texts: Sequence[str], tokenizer: Tokenizer, room: int) -> str | None:
    """Why `texts`, split into sentences, cannot fit in `room` tokens (their sentences' tokens
    together, end tokens aside), or None when they might: "the texts' 4,000,000 characters …"."""
    need = sum(least_split_tokens(tokenizer, t) for t in texts)
    if need <= room:
        return None
    chars = sum(visible_chars(t) for t in texts)
    ascii_per, other_per = (tokenizer.max_chars_per_token(ascii=a) for a in (True, False))
    stands = (
        f"{ascii_per} characters"
        if ascii_per == other_per
        else f"{ascii_per} characters of ASCII text, {other_per} of other text"
    )
    return (
        f"{chars:,} characters besides whitespace need at least {need:,} tokens (a token of this "
        f"model stands for at most {stands})"
    )
