"""The decoder-step graph alone, traced against fused, fp32 and int8: `python -m bench.step_graphs`.

`make bench-step` runs it. Four graphs of one model directory, each one onnxruntime session on one
intra-op thread, run on the same random inputs (the contract's example inputs: a cache of
--cache-len slots, the last row's part-masked, a source of --src-len tokens):

- traced fp32: the exported decoder_step.onnx (onnxruntime's ALL optimisations at load);
- traced int8: the same, dynamically quantized with each activation row on its own (what the int8
  variant's decoder step was before the fused one);
- fused fp32: `export.variants.fused_step` (what the optimized variant's step is made from);
- fused int8: that, with 8-bit weight blocks (`quantize_weight_blocks`; the int8 variant's step).

The fused steps write their cache in place: they run as the engine runs them, bound once per batch
size (`service.engine.graphs.InPlaceBinding`) over the same cache with one more slot, each row's
real slots first (the traced graphs get the same slots, masked alike).

Per batch size the graphs take turns for --repeats rounds; each run is timed by the CPU time of the
calling thread (onnxruntime runs a one-thread session on it), which a shared machine disturbs less
than wall time; the median counts. Prints a markdown table. A measurement, not a test.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bench.cli import benchmark_parser
from export.model_config import TransformerConfig
from export.onnx.contract import example_inputs
from export.variants import graphs as vg
from export.variants.fused_step import build_fused_step
from service.engine.graphs import InPlaceBinding
from service.engine.kv_cache import StepInputs
from service.modeldir.manifest import load_manifest


def graphs(model_dir: Path) -> dict[str, onnx.ModelProto]:
    manifest = load_manifest(model_dir)
    traced = vg.prepare(model_dir / manifest.graphs["decoder_step"].file)
    return {
        "traced fp32": onnx.load(str(model_dir / manifest.graphs["decoder_step"].file)),
        "traced int8": vg.quantize_int8(traced),
        "fused fp32": build_fused_step(model_dir, manifest),
        "fused int8": vg.quantize_weight_blocks(build_fused_step(model_dir, manifest)),
    }


def session(model: onnx.ModelProto, model_dir: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if any(t.external_data for t in model.graph.initializer):  # the traced graph reads model.safetensors
        return ort.InferenceSession(
            str(model_dir / "decoder_step.onnx"), options, providers=["CPUExecutionProvider"]
        )
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure(
    model_dir: Path, batches: Sequence[int], cache_len: int, src_len: int, repeats: int
) -> dict[int, dict[str, float]]:
    """Batch → graph → median milliseconds of one step."""
    manifest = load_manifest(model_dir)
    cfg = TransformerConfig.from_dict(dict(manifest.architecture))
    sessions = {name: session(model, model_dir) for name, model in graphs(model_dir).items()}
    results = {}
    for batch in batches:
        sizes = {"batch": batch, "src_len": src_len, "tgt_len": 1, "cache_len": cache_len}
        feeds = example_inputs(cfg, manifest.graphs["decoder_step"], sizes)
        feeds["self_mask"] = np.arange(cache_len) < feeds["positions"][:, None]  # a prefix per row
        runs = {
            name: (lambda s=s, f=feeds: s.run(None, f)) if name.startswith("traced") else _in_place(s, feeds)
            for name, s in sessions.items()
        }
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.thread_time()
                run()
                times[name].append(time.thread_time() - start)
        results[batch] = {name: 1000 * float(statistics.median(t)) for name, t in times.items()}
    return results


def _in_place(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """A run of the in-place step on the feeds' cache, grown by the slot it writes."""
    layers = sum(1 for name in feeds if name.startswith("past_k_"))

    def stacked(prefix: str, extra: int) -> np.ndarray:
        array = np.stack([feeds[f"{prefix}_{layer}"] for layer in range(layers)])
        return np.pad(array, [(0, 0)] * 3 + [(0, extra), (0, 0)])

    inputs = StepInputs(
        positions=feeds["positions"],
        past_k=stacked("past_k", 1),
        past_v=stacked("past_v", 1),
        cross_k=stacked("cross_k", 0),
        cross_v=stacked("cross_v", 0),
        src_mask=np.ascontiguousarray(feeds["src_mask"]),
    )
    binding = InPlaceBinding(session, inputs, session.get_outputs()[0].shape[1])
    tokens = feeds["tokens"][:, 0]
    return lambda: binding.run(tokens, inputs.positions)


def table(results: dict[int, dict[str, float]]) -> str:
    names = list(next(iter(results.values())))
    lines = ["| batch | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for batch, row in results.items():
        base = row["traced int8"]
        cells = [f"{ms:.3f} ms ({ms / base:.2f}×)" for ms in row.values()]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = benchmark_parser("bench.step_graphs", __doc__, corpus=False)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--cache-len", type=int, default=15)
    parser.add_argument("--src-len", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    np.random.seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    results = measure(args.model_dir, batches, args.cache_len, args.src_len, args.repeats)
    print(
        f"decoder step of {args.model_dir}, cache {args.cache_len} slots, source {args.src_len} tokens, "
        f"1 thread, median CPU ms of {args.repeats} (ratio to traced int8):"
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
