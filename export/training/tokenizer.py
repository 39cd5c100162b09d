"""Train the shared source/target byte-level BPE tokenizer on the corpus.

`python -m export.training.tokenizer --corpus data/corpus --out data/tokenizer.json --vocab-size N`
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from export.corpus import read_pairs
from service.modeldir.tokenizer import SPECIAL_TOKENS


def _texts(pairs: list[tuple[str, str]]) -> Iterator[str]:
    for en, fr in pairs:
        yield en
        yield fr


def train_tokenizer(pairs: list[tuple[str, str]], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE over both languages; special tokens get ids 0..3."""
    tok = HFTokenizer(models.BPE())
    # NFC so that a decomposed "é" typed by a client maps to the same tokens as the corpus.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is ever unknown
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_texts(pairs), trainer=trainer, length=2 * len(pairs))
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=2000)
    args = parser.parse_args()
    tok = train_tokenizer(read_pairs(args.corpus / "train.tsv"), args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    print(f"tokenizer: {tok.get_vocab_size()} tokens → {args.out}")


if __name__ == "__main__":
    main()
