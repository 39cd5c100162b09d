"""The command line every benchmark shares: its name and description, the model and sentences it
reads (`bench.inputs`'s defaults) and the markdown page it writes. Each entry point adds its own flags
between `benchmark_parser` and `add_out`, so that --out stays last in its --help."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.inputs import DEFAULT_CORPUS, DEFAULT_MODEL_DIR


def benchmark_parser(
    module: str, doc: str | None, *, corpus: bool = True, loop_seconds: float | None = None
) -> argparse.ArgumentParser:
    """The parser of `python -m <module>`, described by the first paragraph of its docstring `doc`:
    --clients and --duration (`loop_seconds` by default) when it runs closed loops, then --model-dir
    and, when it reads sentences (`corpus`), --corpus."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc.split("\n\n")[0] if doc else None
    )
    if loop_seconds is not None:
        parser.add_argument("--clients", type=int, default=64)
        parser.add_argument("--duration", type=float, default=loop_seconds, help="seconds per loop")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    if corpus:
        parser.add_argument(
            "--corpus", type=Path, default=DEFAULT_CORPUS, help="TSV whose English side is used"
        )
    return parser


def add_out(parser: argparse.ArgumentParser, default: Path) -> None:
    """--out: the markdown page the benchmark writes, `default` (under docs/) unless told."""
    parser.add_argument("--out", type=Path, default=default, help="the markdown page")
