"""Text ⇄ token ids with the model's `tokenizer.json` (Hugging Face `tokenizers`, byte-level BPE).

Byte-level BPE never meets an unknown character: anything outside the learned merges falls
back to its UTF-8 bytes, so emoji and unseen scripts encode (and decode back) instead of
crashing. Decoding is exact: accents, apostrophes and French spacing round-trip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3 in this order


class InputTooLongError(ValueError):
    """A text needs more tokens than the model accepts."""


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int
    unk: int


class Tokenizer:
    def __init__(self, hf: HFTokenizer) -> None:
        self._hf = hf
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise ValueError(f"tokenizer lacks special tokens {SPECIAL_TOKENS}")
        self.special = SpecialIds(*ids)  # type: ignore[arg-type]
        self._special_set = frozenset(ids)
        # A client's text is text: "<s>", "</s>", "<pad>" or "<unk>" typed in it (an HTML tag comes
        # close enough) must not become control tokens — an end token would cut the source short,
        # a padding one be masked out. The special ids enter only where the code puts them.
        hf.encode_special_tokens = True

    @classmethod
    def from_file(cls, path: Path | str) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing tokenizer file")
        return cls(HFTokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return int(self._hf.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def encode_source(self, text: str, max_tokens: int) -> list[int]:
        """Source ids as the encoder reads them (text + end token), checked against `max_tokens`."""
        ids = [*self.encode(text), self.special.eos]
        if len(ids) > max_tokens:
            raise InputTooLongError(
                f"input is {len(ids)} tokens (end token included), longer than the limit of {max_tokens}"
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens are dropped."""
        return str(self._hf.decode([i for i in ids if i not in self._special_set], skip_special_tokens=True))

    def id_to_token(self, token_id: int) -> str:
        return str(self._hf.id_to_token(token_id))


def translate_in_batches(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    max_source_tokens: int,
    decode_batch: Callable[[list[list[int]]], list[list[int]]],
    batch_size: int = 64,
) -> list[str]:
    """Texts → source ids → `decode_batch` in batches of similar length → texts, in input order.

    Sorting by length keeps padding small. Blank texts give "" without decoding.

    Raises:
        InputTooLongError: a text needs more than `max_source_tokens` (end token included).
    """
    encoded = {
        i: tokenizer.encode_source(t.strip(), max_source_tokens) for i, t in enumerate(texts) if t.strip()
    }
    order = sorted(encoded, key=lambda i: len(encoded[i]))
    out = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, ids in zip(chunk, decode_batch([encoded[i] for i in chunk]), strict=True):
            out[i] = tokenizer.decode(ids)
    return out
