"""Translate English sentences with the PyTorch reference model (the slow, exact reference).

    python -m export.translate [--model-dir models/en-fr-small] [--beam-size 4] < english.txt

Reads one sentence per line on stdin and prints one translation per line on stdout. An empty
line gives an empty line; a line over the model's limit gives an empty line and an error on
stderr naming the limit (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from export.checkpoint import TOKENIZER_FILE, load_model
from export.data import pad
from export.generate import beam_search, greedy_decode
from export.model import Transformer
from service.decoding import default_max_output_tokens
from service.modeldir.tokenizer import InputTooLongError, Tokenizer, translate_in_batches

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "en-fr-small"


def translate_ids(
    model: Transformer, sources: list[list[int]], *, beam_size: int = 1, length_penalty: float = 1.0
) -> list[list[int]]:
    """Decode one padded batch of source ids (each ending with the end token)."""
    src = pad(sources, model.cfg.pad_id)
    # Each sentence's own limit, so that its output never depends on its batch neighbours.
    max_out = [default_max_output_tokens(len(s), model.cfg.max_positions) for s in sources]
    if beam_size == 1:
        return [h.tokens for h in greedy_decode(model, src, max_out)]
    return [
        h[0].tokens
        for h in beam_search(model, src, max_out, beam_size=beam_size, length_penalty=length_penalty)
    ]


def translate_texts(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: list[str],
    *,
    beam_size: int = 1,
    batch_size: int = 64,
) -> list[str]:
    """Translate `texts` in batches of similar length; the output keeps the input order.

    Raises InputTooLongError (naming the limit) when a text exceeds the model's max positions.
    Empty (or blank) texts translate to "" without running the model.
    """
    with torch.inference_mode():
        return translate_in_batches(
            tokenizer,
            texts,
            model.cfg.max_positions,
            lambda sources: translate_ids(model, sources, beam_size=beam_size),
            batch_size,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="Translate English lines on stdin into French on stdout.")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.beam_size < 1:
        parser.error("--beam-size must be at least 1")
    torch.set_num_threads(args.threads)
    model = load_model(args.model_dir)
    tokenizer = Tokenizer.from_file(args.model_dir / TOKENIZER_FILE)
    lines = sys.stdin if sys.stdin.isatty() else sys.stdin.readlines()  # a pipe: batch it all
    failed, first_line = False, 1
    for batch in _chunks(lines, 1 if sys.stdin.isatty() else 256):
        texts = [line.rstrip("\n") for line in batch]
        results = _translate_each(model, tokenizer, texts, args.beam_size, first_line)
        first_line += len(texts)
        for translation, error in results:
            if error:
                print(error, file=sys.stderr)
                failed = True
            print(translation, flush=True)
    sys.exit(1 if failed else 0)


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _translate_each(
    model: Transformer, tokenizer: Tokenizer, texts: list[str], beam_size: int, first_line: int
) -> list[tuple[str, str]]:
    """(translation, error) per text: a text over the limit gets "" and an error naming the limit."""
    errors = {}
    for i, text in enumerate(texts):
        try:
            tokenizer.encode_source(text, model.cfg.max_positions)
        except InputTooLongError as err:
            errors[i] = f"error: line {first_line + i}: {err}"
    good = [i for i in range(len(texts)) if i not in errors]
    translations = translate_texts(model, tokenizer, [texts[i] for i in good], beam_size=beam_size)
    by_index = dict(zip(good, translations, strict=True))
    return [(by_index.get(i, ""), errors.get(i, "")) for i in range(len(texts))]


if __name__ == "__main__":
    main()
