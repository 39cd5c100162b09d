"""CLI: ``python -m export.corpus --out data/corpus [--seed 1234] [--train-size N] ...``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from .config import CorpusConfig
from .splits import generate_corpus
from .storage import write_corpus


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = CorpusConfig()
    parser = argparse.ArgumentParser(prog="python -m export.corpus", description=__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train-size", type=int, default=defaults.train_size)
    parser.add_argument("--valid-size", type=int, default=defaults.valid_size)
    parser.add_argument("--test-size", type=int, default=defaults.test_size)
    parser.add_argument("--heldout-size", type=int, default=defaults.heldout_size)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    config = CorpusConfig(
        seed=args.seed,
        train_size=args.train_size,
        valid_size=args.valid_size,
        test_size=args.test_size,
        heldout_size=args.heldout_size,
    )
    start = time.perf_counter()
    splits = generate_corpus(config)
    write_corpus(splits, args.out)
    elapsed = time.perf_counter() - start
    sizes = " ".join(f"{name}={len(pairs)}" for name, pairs in splits.items())
    print(f"corpus seed={config.seed} {sizes} -> {args.out} in {elapsed:.1f}s")


if __name__ == "__main__":
    main()
