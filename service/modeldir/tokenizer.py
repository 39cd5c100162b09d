"""Text ⇄ token ids, with the tokenizer file a model directory names.

Two kinds, one interface (`Tokenizer`), chosen by `load_tokenizer` from the file's content:
- `BpeTokenizer`: a `tokenizers` file (`tokenizer.json`): this project's own models (byte-level
  BPE, which never meets an unknown character), or, named by a small descriptor
  (`multilingual.json`) with its special ids and language tokens, an imported NLLB model's.
- `MarianTokenizer`: an imported OPUS-MT model's SentencePiece models and vocabulary, named by a
  small descriptor (`sentencepiece.json`); ids equal Transformers' `MarianTokenizer`. Its
  `M2M100Tokenizer` variant: an M2M100 model's, with language tokens.

A multilingual tokenizer (`languages` not empty) puts the source language's token before the
source, as Transformers' NLLB and M2M100 tokenizers do; the target language's token is the first
output token, which the decoder is given (service.decoding's forced start).

A text too long for the model is refused from its length alone where the tokenizer allows
(`max_chars_per_token`): tokenising a few megabytes takes seconds, and no text over the limit
needs to be tokenised to know it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import sentencepiece
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3 in this order

# NFC joins a character and the marks after it into one character, whose canonical decomposition
# they are: at most 4 characters become one (the longest decomposition in Unicode, e.g. U+1F82 ᾂ,
# alpha and three marks; tests/service/modeldir/test_tokenizer.py checks it against Python's tables).
NFC_MOST_JOINED = 4


class InputTooLongError(ValueError):
    """A text needs more tokens than the model accepts."""


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int
    unk: int


class Tokenizer(ABC):
    """Source text → source ids, target ids → target text. Special ids never come from text."""

    special: SpecialIds
    files: tuple[str, ...]  # the files it reads, relative to its own file's folder (itself first)
    languages: Mapping[str, int] = {}  # language code → its token; empty for a bilingual model

    @classmethod
    def from_file(cls, path: Path | str) -> Tokenizer:
        return load_tokenizer(path)

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """The target vocabulary's size (what decoding chooses from)."""

    @property
    def source_vocab_size(self) -> int:
        """The source vocabulary's size: the target's where the two are one."""
        return self.vocab_size

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Source ids of each text, without special tokens."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of target `ids`; special tokens are dropped."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The target token of an id, as the vocabulary spells it."""

    def source_token(self, token_id: int) -> str:
        """The source token of an id (what `encode` gave), as the source vocabulary spells it; the
        target token where source and target share one vocabulary."""
        return self.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Source ids of `text`, without special tokens."""
        return self.encode_batch([text])[0]

    def encode_target(self, text: str) -> list[int]:
        """Target ids of `text` (a target prefix, Attend's target), without special tokens; the
        source ids where source and target share one tokenization."""
        return self.encode(text)

    def max_chars_per_token(self, *, ascii: bool) -> int | None:
        """The most characters of a text (`ascii`: of an ASCII text) that one token stands for, in
        `encode` and `encode_target` alike: a text of n characters gives at least ceil(n / this)
        tokens, known without tokenising it. None: no such bound (the tokenizer may drop characters,
        or join any number of them into one token)."""
        return None

    def least_tokens(self, text: str) -> int:
        """At least how many tokens `encode(text)` (and `encode_target`) gives, from its length
        alone (0 when the tokenizer gives no bound)."""
        per = self.max_chars_per_token(ascii=text.isascii())
        return 0 if per is None else -(-len(text) // per)

    def check_length(self, text: str, max_tokens: int, *, extra: int = 1) -> None:
        """Refuses `text` when, with `extra` tokens more (its end token), it needs more than
        `max_tokens` tokens, known from its length alone: a long text takes long to tokenise.

        Raises:
            InputTooLongError: naming the length, the tokens it needs at least and the limit.
        """
        least = self.least_tokens(text) + extra
        if least > max_tokens:
            per = self.max_chars_per_token(ascii=text.isascii())
            raise InputTooLongError(
                f"input is {len(text):,} characters, at least {least:,} tokens (end token included; a "
                f"token of this model stands for at most {per} characters), longer than the limit of "
                f"{max_tokens}"
            )

    def encode_source(self, text: str, max_tokens: int, language: str | None = None) -> list[int]:
        """Source ids as the encoder reads them (text + end token; a multilingual model's source
        language token first), checked against `max_tokens`.

        Raises:
            InputTooLongError: over `max_tokens`.
            KeyError: a language this tokenizer does not have.
        """
        prefix = [self.languages[language]] if language is not None and self.languages else []
        self.check_length(text, max_tokens, extra=len(prefix) + 1)
        ids = [*prefix, *self.encode(text), self.special.eos]
        if len(ids) > max_tokens:
            raise InputTooLongError(
                f"input is {len(ids)} tokens (end token included), longer than the limit of {max_tokens}"
            )
        return ids


def load_tokenizer(path: Path | str) -> Tokenizer:
    """The tokenizer a file describes: a SentencePiece descriptor, else a `tokenizers` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing tokenizer file")
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "sentencepiece" in data:
        return M2M100Tokenizer(path, data) if data.get("family") == "m2m100" else MarianTokenizer(path, data)
    if isinstance(data, dict) and "tokenizer" in data and "languages" in data:
        return BpeTokenizer.described(path, data)
    return BpeTokenizer(HFTokenizer.from_file(str(path)), path.name)


def _special_ids(path: Path, data: dict) -> SpecialIds:
    try:
        return SpecialIds(**{k: int(data["special_ids"][k]) for k in ("pad", "bos", "eos", "unk")})
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed special_ids ({err!r} missing or wrong)") from err


class BpeTokenizer(Tokenizer):
    def __init__(
        self,
        hf: HFTokenizer,
        file: str = "tokenizer.json",
        special: SpecialIds | None = None,
        languages: Mapping[str, int] | None = None,
    ) -> None:
        """`special`: default the ids of SPECIAL_TOKENS in the vocabulary."""
        self._hf = hf
        self.files = (file,)
        if special is None:
            ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
            if any(i is None for i in ids):
                raise ValueError(f"tokenizer lacks special tokens {SPECIAL_TOKENS}")
            special = SpecialIds(*ids)  # type: ignore[arg-type]
        self.special = special
        self.languages = dict(languages or {})
        self._special_set = frozenset([*astuple(special), *self.languages.values()])
        # A client's text is text: "<s>", "</s>", "<pad>" or "<unk>" typed in it (an HTML tag comes
        # close enough) must not become control tokens — an end token would cut the source short,
        # a padding one be masked out. The special ids enter only where the code puts them.
        hf.encode_special_tokens = True
        self._token_bytes = _byte_level_token_bytes(hf)
        self._nfc = isinstance(hf.normalizer, normalizers.NFC)

    @classmethod
    def described(cls, path: Path, data: dict) -> BpeTokenizer:
        """The tokenizers file a descriptor names, with its special ids and language tokens:
        {"tokenizer": FILE, "special_ids": {"pad", "bos", "eos", "unk"}, "languages": {code: id}},
        `bos` being the decoder's start token."""
        name = data["tokenizer"]
        if not (path.parent / name).is_file():
            raise FileNotFoundError(f"{path.parent / name}: missing tokenizer file (named by {path.name})")
        languages = {str(code): int(i) for code, i in data["languages"].items()}
        hf = HFTokenizer.from_file(str(path.parent / name))
        tokenizer = cls(hf, name, _special_ids(path, data), languages)
        tokenizer.files = (path.name, name)
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self._hf.get_vocab_size())

    def max_chars_per_token(self, *, ascii: bool) -> int | None:
        # A character is at least a byte. NFC leaves ASCII as it is, and joins at most
        # NFC_MOST_JOINED characters into one.
        if self._token_bytes is None:
            return None
        return self._token_bytes if ascii or not self._nfc else self._token_bytes * NFC_MOST_JOINED

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return str(self._hf.decode([i for i in ids if i not in self._special_set], skip_special_tokens=True))

    def id_to_token(self, token_id: int) -> str:
        return str(self._hf.id_to_token(token_id))


def _byte_level_token_bytes(hf: HFTokenizer) -> int | None:
    """The most UTF-8 bytes one token holds, where every byte of a text goes into exactly one token:
    a byte-level BPE with all 256 bytes in its vocabulary (so none is ever dropped), no truncation, a
    normalizer that drops no character (none, or NFC), and no added token that takes in the spaces
    around it. Else None: SentencePiece-style normalizers drop control characters, for one."""
    if (
        not isinstance(hf.pre_tokenizer, pre_tokenizers.ByteLevel)
        or not isinstance(hf.model, models.BPE)
        or hf.truncation is not None
        or not (hf.normalizer is None or isinstance(hf.normalizer, normalizers.NFC))
    ):
        return None
    vocab = hf.get_vocab(with_added_tokens=False)
    if not set(pre_tokenizers.ByteLevel.alphabet()) <= vocab.keys():
        return None
    added = hf.get_added_tokens_decoder().values()
    if any((t.lstrip or t.rstrip) and not t.special for t in added):
        return None
    # a byte-level vocabulary spells each byte as one character; added tokens are plain text
    return max([len(token) for token in vocab] + [len(t.content.encode("utf-8")) for t in added])


_UNDERLINE = "\u2581"  # SentencePiece's word-start mark


class MarianTokenizer(Tokenizer):
    """OPUS-MT's tokenization: SentencePiece pieces of the source model, looked up in the vocabulary
    (a piece it lacks is unknown), then the end token; a leading `>>xx<<` target-language code is a
    token of its own. Target ids map back through the target vocabulary (the same one unless the
    model has separate vocabularies) and decode with the SentencePiece model Transformers uses:
    the source one for a shared vocabulary, the target one otherwise.

    The descriptor: {"sentencepiece": {"source": FILE, "target": FILE, "vocab": FILE,
    "target_vocab": FILE or null}, "special_ids": {"pad", "bos", "eos", "unk"}}, `bos` being the
    decoder's start token (the pad token in OPUS-MT).
    """

    def __init__(self, path: Path, data: dict) -> None:
        folder = path.parent
        self.special = _special_ids(path, data)
        try:
            spec = data["sentencepiece"]
            source, target, vocab, target_vocab = (
                spec["source"],
                spec["target"],
                spec["vocab"],
                spec.get("target_vocab"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path}: malformed SentencePiece descriptor ({err!r} missing or wrong)"
            ) from err
        self.files = (path.name, *dict.fromkeys(n for n in (source, target, vocab, target_vocab) if n))
        for name in self.files[1:]:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: missing tokenizer file (named by {path.name})")
        self._source = sentencepiece.SentencePieceProcessor(model_file=str(folder / source))
        self._target = sentencepiece.SentencePieceProcessor(model_file=str(folder / target))
        self._vocab: dict[str, int] = json.loads((folder / vocab).read_text(encoding="utf-8"))
        self._target_vocab: dict[str, int] = (
            json.loads((folder / target_vocab).read_text(encoding="utf-8")) if target_vocab else self._vocab
        )
        # Transformers decodes with the source model unless the vocabularies are separate
        self._decoder_spm = self._target if target_vocab else self._source
        self._pieces = {int(i): piece for piece, i in self._target_vocab.items()}
        self._source_pieces = (
            {int(i): piece for piece, i in self._vocab.items()} if target_vocab else self._pieces
        )
        self._special_set = frozenset(astuple(self.special))

    @property
    def vocab_size(self) -> int:
        return len(self._target_vocab)

    @property
    def source_vocab_size(self) -> int:
        return len(self._vocab)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = []
        for text in texts:
            code: list[str] = []
            if text.startswith(">>") and (end := text.find("<<")) != -1:  # a target-language code
                code, text = [text[: end + 2]], text[end + 2 :]
            out.append(self._ids(code + self._source.encode(text, out_type=str), self._vocab))
        return out

    def encode_target(self, text: str) -> list[int]:
        return self._ids(self._target.encode(text, out_type=str), self._target_vocab)

    def _ids(self, pieces: list[str], vocab: dict[str, int]) -> list[int]:
        return [vocab.get(piece, self.special.unk) for piece in pieces]

    def decode(self, ids: list[int]) -> str:
        pieces = [self._pieces.get(i, "") for i in ids if i not in self._special_set]
        return str(self._decoder_spm.decode_pieces(pieces)).replace(_UNDERLINE, " ").strip()

    def id_to_token(self, token_id: int) -> str:
        return self._pieces.get(token_id, "")

    def source_token(self, token_id: int) -> str:
        return self._source_pieces.get(token_id, "")


class M2M100Tokenizer(MarianTokenizer):
    """M2M100's tokenization: one SentencePiece model for both sides, pieces looked up in
    vocab.json (a piece it lacks is unknown), its language tokens (`__fr__`) after the vocabulary.
    The descriptor is MarianTokenizer's with "family": "m2m100" and "languages": {code: id}.
    Unlike Marian's, a text's leading `>>xx<<` is text, and decoding keeps what SentencePiece
    gives (as Transformers' M2M100Tokenizer)."""

    def __init__(self, path: Path, data: dict) -> None:
        super().__init__(path, data)
        self.languages = {str(code): int(i) for code, i in data.get("languages", {}).items()}
        self._special_set = frozenset([*self._special_set, *self.languages.values()])
        self._pieces.update({i: f"__{code}__" for code, i in self.languages.items()})

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._ids(self._source.encode(text, out_type=str), self._vocab) for text in texts]

    def decode(self, ids: list[int]) -> str:
        pieces = [self._pieces.get(i, "") for i in ids if i not in self._special_set]
        return str(self._decoder_spm.decode(pieces)).strip()


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
