"""How much the KV cache speeds up decoding: `python -m bench.kv_cache` (`make bench-kv`).

For every batch size and output length, each variant of `bench.variants` decodes the same real
test-set sentences to exactly that many tokens; one untimed run per variant warms it up and
checks that all variants agree token for token, then the variants take turns (the order rotates
every repeat) so that a burst of load from a neighbour hits them alike. Reported: the median
wall time of a whole request per variant (as tokens/s) and, per baseline, the median over repeats
of its time divided by the cached time of the same repeat. The result is written as markdown
(`bench.report`). A measurement, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.cli import add_out, benchmark_parser
from bench.inputs import load_texts
from bench.report import Cell, Machine, Run, describe_machine, write_report
from bench.variants import BASELINES, VARIANTS, ForcedLengthDecoders, Variant
from service.modeldir.tokenizer import Tokenizer

DEFAULT_OUT = Path("docs/kv-cache-benchmark.md")
SOURCE_TOKENS = (10, 20)  # source length range, end token included: ordinary sentences


def load_sources(
    tokenizer: Tokenizer, corpus: Path, count: int, token_range: tuple[int, int] = SOURCE_TOKENS
) -> tuple[list[list[int]], str]:
    """The source ids of the first `count` English sentences of `corpus` whose length (end token
    included) lies within `token_range`; the test split is generated when the file is missing.

    Returns:
        (the sources, where they come from in words).
    Raises:
        ValueError: fewer than `count` sentences qualify.
    """
    english, origin = load_texts(corpus)
    low, high = token_range
    sources = [[*ids, tokenizer.special.eos] for ids in tokenizer.encode_batch(english)]
    chosen = [ids for ids in sources if low <= len(ids) <= high][:count]
    if len(chosen) < count:
        raise ValueError(f"{corpus}: only {len(chosen)} sentences of {low}–{high} tokens, {count} needed")
    return chosen, origin


def measure_cell(
    decoders: ForcedLengthDecoders,
    sources: Sequence[Sequence[int]],
    output_tokens: int,
    variants: Sequence[Variant],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> Cell:
    """Warm up and cross-check every variant on `sources`, then time `repeats` interleaved rounds."""
    assert variants and variants[0] == "cached", "the cache is what the baselines are divided by"
    outputs = {v: decoders.decode(v, sources, output_tokens) for v in variants}
    identical = all(outputs[v] == outputs["cached"] for v in variants)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for repeat in range(repeats):
        shift = repeat % len(variants)
        for variant in (*variants[shift:], *variants[:shift]):
            gc.collect()  # garbage left by the previous run is not this run's cost
            start = clock()
            decoders.decode(variant, sources, output_tokens)
            times[variant].append(clock() - start)
    ratios: dict[str, float] = {
        b: statistics.median([t / c for t, c in zip(times[b], times["cached"], strict=True)])
        for b in variants[1:]
    }
    seconds = {v: statistics.median(ts) for v, ts in times.items()}
    return Cell(len(sources), output_tokens, seconds, ratios, identical)


def run_benchmark(
    decoders: ForcedLengthDecoders,
    pool: Sequence[Sequence[int]],
    *,
    batches: Sequence[int],
    lengths: Sequence[int],
    variants: Sequence[Variant] = VARIANTS,
    repeats: int = 5,
    log: Callable[[str], None] = lambda _: None,
) -> list[Cell]:
    """Every batch size × output length; batch B decodes the first B sentences of `pool`."""
    cells = []
    for batch in batches:
        if batch > len(pool):
            raise ValueError(f"batch {batch} needs {batch} sentences, the pool has {len(pool)}")
        for length in lengths:
            cell = measure_cell(decoders, pool[:batch], length, variants, repeats)
            log(_summary(cell, variants))
            cells.append(cell)
    return cells


def _summary(cell: Cell, variants: Sequence[str]) -> str:
    rates = ", ".join(f"{v} {cell.tokens_per_second(v):.0f}" for v in variants)
    ratios = ", ".join(f"{b} ×{r:.1f}" for b, r in cell.speedups.items())
    same = "" if cell.identical else "  OUTPUTS DIFFER"
    return f"batch {cell.batch:>3}, {cell.output_tokens:>3} tokens: tok/s {rates} | {ratios}{same}"


def _parser() -> argparse.ArgumentParser:
    parser = benchmark_parser("bench.kv_cache", __doc__)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (all variants)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant and cell (median)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64], help="output tokens")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes")
    parser.add_argument(
        "--baselines", nargs="+", choices=BASELINES, default=list(BASELINES), help="what the cache is against"
    )
    add_out(parser, DEFAULT_OUT)
    return parser


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces a run, every option spelled out."""
    return " ".join(
        [
            "python -m bench.kv_cache",
            f"--model-dir {args.model_dir}",
            f"--corpus {args.corpus}",
            f"--threads {args.threads}",
            f"--repeats {args.repeats}",
            "--lengths " + " ".join(map(str, args.lengths)),
            "--batches " + " ".join(map(str, args.batches)),
            "--baselines " + " ".join(args.baselines),
            f"--out {args.out}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or min(args.lengths) < 1 or min(args.batches) < 1:
        raise SystemExit("--threads, --repeats, --lengths and --batches must be at least 1")
    variants: list[Variant] = ["cached", *(b for b in BASELINES if b in args.baselines)]
    machine_before: Machine = describe_machine()
    decoders = ForcedLengthDecoders(args.model_dir, intra_op_threads=args.threads)
    tokenizer = Tokenizer.from_file(args.model_dir / decoders.graphs.manifest.tokenizer)
    pool, origin = load_sources(tokenizer, args.corpus, max(args.batches))
    started = time.monotonic()
    cells = run_benchmark(
        decoders,
        pool,
        batches=args.batches,
        lengths=args.lengths,
        variants=variants,
        repeats=args.repeats,
        log=lambda line: print(line, file=sys.stderr),
    )
    run = Run(
        model_dir=args.model_dir,
        dims=decoders.graphs.dims,
        architecture=decoders.graphs.manifest.architecture,
        threads=args.threads,
        repeats=args.repeats,
        variants=tuple(variants),
        corpus=origin,
        source_lengths=tuple(len(s) for s in pool),
        cells=tuple(cells),
        command=_command(args),
        minutes=(time.monotonic() - started) / 60,
        load_before=machine_before.load,
        machine=describe_machine(),
    )
    write_report(args.out, run)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
