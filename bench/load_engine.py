"""The library-level half of `bench.load`: the engine alone (the ceiling) and the KV-cache cell."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.engine.engine import Engine
from service.engine.reference_decoder import translate_ids
from service.modeldir.tokenizer import Tokenizer

KV_BATCH, KV_TOKENS = 64, 64


@dataclass(frozen=True)
class EngineResult:
    """The engine alone: every sentence of the pool decoded in batches of `batch`, by `callers` threads."""

    batch: int
    callers: int  # threads decoding their share of the pool at once, each in batches of `batch`
    threads: int  # onnxruntime intra-op threads per run (0: onnxruntime's default, all cores)
    sentences: int
    output_tokens: int  # end tokens included, as the service counts them
    seconds: float  # median over repeats of decoding the whole pool
    sentences_per_s: float
    output_tokens_per_s: float


@dataclass(frozen=True)
class KvResult:
    """`bench.kv_cache.measure_cell` at one batch and output length: cached loop against recompute."""

    batch: int
    output_tokens: int
    threads: int
    repeats: int
    cached_tokens_per_s: float
    recompute_tokens_per_s: float
    speedup: float  # median over repeats of recompute time / cached time
    identical: bool


def measure_engine(
    engine: Engine,
    sources: Sequence[Sequence[int]],
    batches: Sequence[int],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    *,
    callers: int = 1,
) -> list[EngineResult]:
    """Greedy `translate_ids` over the whole pool in chunks of each batch size; one untimed pass per
    batch size, then `repeats` rounds in which the batch sizes take turns (order rotated).

    With `callers` > 1 the pool is dealt out to that many threads, each decoding its share in
    chunks of the batch size at the same time (onnxruntime runs concurrently and releases the GIL):
    the library-level counterpart of the service's `--instances`.
    """
    graphs = engine.graphs()
    shares = [sources[i::callers] for i in range(callers)]

    def decode_share(share: Sequence[Sequence[int]], batch: int) -> int:
        tokens = 0
        for i in range(0, len(share), batch):
            for hyps in translate_ids(graphs, share[i : i + batch]):
                tokens += hyps[0].length
        return tokens

    def decode(pool: ThreadPoolExecutor, batch: int) -> int:
        return sum(pool.map(lambda share: decode_share(share, batch), shares))

    with ThreadPoolExecutor(callers) as pool:
        tokens = {b: decode(pool, b) for b in batches}
        times: dict[int, list[float]] = {b: [] for b in batches}
        for repeat in range(repeats):
            shift = repeat % len(batches)
            for batch in (*batches[shift:], *batches[:shift]):
                gc.collect()
                start = clock()
                decode(pool, batch)
                times[batch].append(clock() - start)
    threads = engine.config.intra_op_threads
    results = []
    for b in batches:
        seconds = statistics.median(times[b])
        results.append(
            EngineResult(
                b,
                callers,
                threads,
                len(sources),
                tokens[b],
                seconds,
                len(sources) / seconds,
                tokens[b] / seconds,
            )
        )
    return results


def measure_kv(model_dir: Path, corpus: Path, repeats: int, threads: int = 1) -> KvResult:
    """The KV-cache benchmark's cell at batch 64 × 64 output tokens, cached against recompute."""
    from bench.kv_cache import load_sources, measure_cell  # torch: only when this part runs
    from bench.variants import ForcedLengthDecoders

    decoders = ForcedLengthDecoders(model_dir, intra_op_threads=threads)
    tokenizer = Tokenizer.from_file(model_dir / decoders.graphs.manifest.tokenizer)
    pool, _ = load_sources(tokenizer, corpus, KV_BATCH)
    cell = measure_cell(decoders, pool, KV_TOKENS, ("cached", "recompute"), repeats)
    return KvResult(
        KV_BATCH,
        KV_TOKENS,
        threads,
        repeats,
        cell.tokens_per_second("cached"),
        cell.tokens_per_second("recompute"),
        cell.speedups["recompute"],
        cell.identical,
    )


@dataclass(frozen=True)
class StepCost:
    """One decoder step of `rows` rows whose caches hold `slots` past tokens (engine.step, timed)."""

    rows: int
    slots: int
    milliseconds: float  # median of the timed steps


def measure_step_cost(
    engine: Engine,
    sources: Sequence[Sequence[int]],
    rows: int,
    slots: Sequence[int],
    repeats: int = 50,
    clock: Callable[[], float] = time.perf_counter,
) -> list[StepCost]:
    """The decoder step's cost as the cache grows: `rows` sentences stepped from an empty cache,
    timed (median of `repeats` runs of the same step, its new slot not kept) when their caches
    hold each count of `slots`.

    Every step attends over the cache's slot capacity (the longest row's, in chunks), real or
    masked, so this is what a row pays for sharing its steps with a longer one.
    """
    name = next(iter(engine.models))
    graphs = engine.graphs(name)
    cache = graphs.new_cache()  # host memory (the CPU engine's): its step inputs are views, timed alone
    cache.append(engine.encode(name, [sources[i % len(sources)] for i in range(rows)]))
    tokens = np.full(rows, engine.models[name].dims.bos_id, dtype=np.int64)
    results = []
    for past in range(max(slots) + 1):
        if past in slots:
            inputs = cache.step_inputs()
            times = []
            for _ in range(repeats):
                start = clock()
                graphs.run_step(tokens, inputs)  # the cache is not written: the same step again
                times.append(clock() - start)
            results.append(StepCost(rows, past, 1000 * statistics.median(times)))
        engine.step(name, tokens, cache)
    return results
