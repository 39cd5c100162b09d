"""The Python cost of the search bookkeeping per decoder step: `python -m bench.search_cost`.

`make bench-search` runs it. The reference decoder (`service.engine.reference_decoder`) decodes the
first --sentences test sentences with the model's graphs (the int8 variant by default), in batches
of 1, 8, 32 and 64, greedy and beam 4, and every step's log-probabilities are recorded. Then
`service.decoding.advance_rows` replays them: the whole search of every batch, step by step, as the
scheduler's loop calls it, without the graphs. With --baseline REV the `service/decoding.py` of a git
revision is loaded beside this checkout's (`git show`), both replay the same steps, and their final
hypotheses must be identical (tokens, scores, per-token log-probs); the two take turns, the order
alternating every round, and each replay is timed by the calling thread's CPU time (less disturbed
by neighbours on a shared machine than wall time). Prints a markdown table: microseconds of
`advance_rows` per decoder step (median over rounds), per batch size and search. A measurement, not
a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.cli import benchmark_parser
from bench.inputs import load_texts
from service import decoding
from service.engine.graphs import OnnxGraphs
from service.engine.reference_decoder import CachedSteps, StepSource, run_search, start_states
from service.modeldir.tokenizer import Tokenizer

SEARCHES = {"greedy": 1, "beam 4": 4}  # name → beam size


class _Recorder:
    """A `StepSource` that keeps a copy of every step's log-probs of the one it wraps."""

    def __init__(self, steps: StepSource) -> None:
        self.inner = steps
        self.steps: list[np.ndarray] = []

    def run(self, sentences: np.ndarray, parents: np.ndarray | None, tokens: np.ndarray) -> np.ndarray:
        log_probs = self.inner.run(sentences, parents, tokens)
        self.steps.append(np.array(log_probs, dtype=np.float32, copy=True))
        return log_probs


@dataclass(frozen=True)
class Recording:
    """One batch decoded by the reference decoder: its options and every step's log-probs."""

    options: list[decoding.SearchOptions]
    steps: list[np.ndarray]  # (rows of the step, V) each


def record(graphs: OnnxGraphs, sources: Sequence[Sequence[int]], beam_size: int) -> Recording:
    states = start_states(graphs.dims, sources, beam_size, 1.0, None, 1)
    options = [s.options for s in states]
    recorder = _Recorder(CachedSteps(graphs, sources))
    run_search(states, recorder, graphs.dims.bos_id)
    return Recording(options, recorder.steps)


def replay(module: types.ModuleType, recording: Recording) -> tuple[float, list[tuple]]:
    """Seconds of thread CPU time in `module.advance_rows` over the whole recording, and every
    sentence's final hypotheses (as plain tuples, comparable across modules)."""
    options = [module.SearchOptions(**dataclasses.asdict(o)) for o in recording.options]
    states = [module.start_search(o) for o in options]
    live = [i for i, s in enumerate(states) if not s.done]
    spent = 0.0
    for log_probs in recording.steps:
        step_states = [states[i] for i in live]
        start = time.thread_time()
        moved = module.advance_rows(step_states, log_probs)
        spent += time.thread_time() - start
        for i, state in zip(live, moved.states, strict=True):
            states[i] = state
        live = [i for i in live if not states[i].done]
    assert not live, "the recording ended before the search did"
    outputs = [tuple(dataclasses.astuple(h) for h in s.hypotheses()) for s in states]
    return spent, outputs


def load_revision(revision: str) -> types.ModuleType:
    """`service/decoding.py` as it is at a git revision, as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:service/decoding.py"],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    module = types.ModuleType(f"decoding_at_{revision}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:service/decoding.py", "exec"), module.__dict__)
    return module


@dataclass(frozen=True)
class Row:
    search: str
    batch: int
    steps: int  # decoder steps over all batches of the cell
    rows_per_step: float
    micros: dict[str, float]  # implementation → µs of advance_rows per step (median over rounds)
    identical: bool


def measure(
    graphs: OnnxGraphs,
    sources: Sequence[Sequence[int]],
    batches: Sequence[int],
    modules: dict[str, types.ModuleType],
    rounds: int,
) -> list[Row]:
    rows = []
    for search, beam_size in SEARCHES.items():
        for batch in batches:
            recordings = [
                record(graphs, sources[first : first + batch], beam_size)
                for first in range(0, len(sources), batch)
            ]
            steps = sum(len(r.steps) for r in recordings)
            total_rows = sum(len(lp) for r in recordings for lp in r.steps)
            outputs = {
                name: [replay(m, r)[1] for r in recordings] for name, m in modules.items()
            }  # untimed: warms up, and checks that they agree
            first_outputs = next(iter(outputs.values()))
            identical = all(o == first_outputs for o in outputs.values())
            times: dict[str, list[float]] = {name: [] for name in modules}
            names = list(modules)
            for turn in range(rounds):
                for name in names if turn % 2 == 0 else names[::-1]:
                    gc.collect()
                    times[name].append(sum(replay(modules[name], r)[0] for r in recordings))
            micros = {name: 1e6 * statistics.median(ts) / steps for name, ts in times.items()}
            row = Row(search, batch, steps, total_rows / steps, micros, identical)
            print(_line(row, names), file=sys.stderr)
            rows.append(row)
    return rows


def _line(row: Row, names: Sequence[str]) -> str:
    cells = [f"{row.micros[n]:.1f}" for n in names]
    if len(names) == 2:
        cells.append(f"×{row.micros[names[0]] / row.micros[names[1]]:.2f}")
    same = "" if row.identical else " | OUTPUTS DIFFER"
    return f"| {row.search} | {row.batch} | {row.rows_per_step:.1f} | " + " | ".join(cells) + f" |{same}"


def table(rows: Sequence[Row], names: Sequence[str]) -> str:
    header = ["search", "batch", "rows per step", *(f"{n} µs/step" for n in names)]
    if len(names) == 2:
        header.append("speed-up")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    lines += [_line(r, names) for r in rows]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = benchmark_parser("bench.search_cost", __doc__)
    parser.add_argument("--variant", default="int8", help="the model directory's variant ('' for fp32)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--sentences", type=int, default=64, help="test sentences, decoded in batches")
    parser.add_argument("--rounds", type=int, default=7, help="timed replays per implementation (median)")
    parser.add_argument("--baseline", help="a git revision whose service/decoding.py to compare with")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rounds < 1 or args.sentences < 1 or min(args.batches) < 1:
        raise SystemExit("--rounds, --sentences and --batches must be at least 1")
    model_dir = args.model_dir / args.variant if args.variant else args.model_dir
    graphs = OnnxGraphs(model_dir, intra_op_threads=1)
    tokenizer = Tokenizer.from_file(model_dir / graphs.manifest.tokenizer)
    texts, origin = load_texts(args.corpus, args.sentences)
    sources = [tokenizer.encode_source(t, graphs.dims.max_positions) for t in texts]
    modules = {"this checkout": decoding}
    if args.baseline:
        modules = {args.baseline: load_revision(args.baseline), **modules}
    rows = measure(graphs, sources, args.batches, modules, args.rounds)
    print(f"{len(sources)} sentences of {origin}, {model_dir}; {platform.processor() or platform.machine()}")
    print(table(rows, list(modules)))
    return 0 if all(r.identical for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
