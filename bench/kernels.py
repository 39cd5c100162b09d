"""Single onnxruntime kernels at the decoder step's sizes: `python -m bench.kernels`.

`make bench-kernels` runs it. Two questions the int8 decoder step raised (docs/variants.md):

- a matrix product x (M, K) @ W (K, N) with W fixed: fp32 `MatMul`; `MatMulNBits` as the int8
  variant's step builds it (`export.variants.graphs.quantize_weight_blocks`: 8-bit weight blocks of
  32, each activation row quantized by the kernel); `DynamicQuantizeMatMul` (per-column int8
  weights, the whole batch's activations quantized with one scale, so a row's result depends on its
  neighbours: measured, not used);
- self-attention over a cache of `--slots` slots, one new token per row: `MultiHeadAttention` with
  the past K/V, a key padding mask and its present outputs (what the first fused step ran) against
  `GroupQueryAttention` writing into the cache bound as its past and present (the in-place step).

Each graph is one onnxruntime session on one intra-op thread; per size the graphs take turns for
--repeats rounds, each run timed by the calling thread's CPU time; the median counts. Prints
markdown tables. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.variants.graphs import quantize_weight_blocks

F32 = TensorProto.FLOAT


def _session(
    nodes: list[onnx.NodeProto], inputs: list, outputs: list, inits: Sequence = ()
) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "kernel", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "kernel",
        [helper.make_tensor_value_info("x", F32, ["m", k])],
        [helper.make_tensor_value_info("y", F32, ["m", n])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def matmul_sessions(w: np.ndarray) -> dict[str, ort.InferenceSession]:
    k, n = w.shape
    x, y = (
        helper.make_tensor_value_info("x", F32, ["m", k]),
        helper.make_tensor_value_info("y", F32, ["m", n]),
    )
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    dynamic = _session(
        [helper.make_node("DynamicQuantizeMatMul", ["x", "wq", "ws", "", ""], ["y"], domain="com.microsoft")],
        [x],
        [y],
        [
            numpy_helper.from_array(np.round(w / scale).astype(np.int8), "wq"),
            numpy_helper.from_array(scale, "ws"),
        ],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1

    def load(model: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    nbits = load(quantize_weight_blocks(_matmul_model(w)))
    return {
        "MatMul fp32": load(_matmul_model(w)),
        "MatMulNBits 8-bit": nbits,
        "DynamicQuantizeMatMul": dynamic,
    }


def attention_runs(
    rows: int, heads: int, head_dim: int, slots: int, seed: int = 0
) -> dict[str, Callable[[], object]]:
    """One run of each self-attention kernel on the same cache (row r's real slots: a random count)."""
    d = heads * head_dim
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((rows, 1, 3 * d)).astype(np.float32)
    past = rng.standard_normal((2, rows, heads, slots, head_dim)).astype(np.float32)
    lengths = rng.integers(0, slots - 1, rows).astype(np.int32)
    cache: list[str | int] = ["b", heads, "t", head_dim]
    mha = _session(
        [
            helper.make_node("Split", ["qkv"], ["q", "k", "v"], axis=-1, num_outputs=3),
            helper.make_node(
                "MultiHeadAttention",
                ["q", "k", "v", "", "mask", "", "pk", "pv"],
                ["out", "prk", "prv"],
                domain="com.microsoft",
                num_heads=heads,
            ),
        ],
        [
            helper.make_tensor_value_info("qkv", F32, ["b", 1, 3 * d]),
            helper.make_tensor_value_info("pk", F32, cache),
            helper.make_tensor_value_info("pv", F32, cache),
            helper.make_tensor_value_info("mask", TensorProto.INT32, ["b", "t1"]),
        ],
        [helper.make_tensor_value_info(n, F32, None) for n in ("out", "prk", "prv")],
    )
    mask = np.ones((rows, slots + 1), np.int32)
    mask[:, :slots] = np.arange(slots) < lengths[:, None]
    feeds = {"qkv": qkv, "pk": past[0], "pv": past[1], "mask": mask}
    gqa = _session(
        [
            helper.make_node(
                "GroupQueryAttention",
                ["qkv", "", "", "pk", "pv", "seqlens", "total"],
                ["out", "prk", "prv"],
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=heads,
            )
        ],
        [
            helper.make_tensor_value_info("qkv", F32, ["b", 1, 3 * d]),
            helper.make_tensor_value_info("pk", F32, cache),
            helper.make_tensor_value_info("pv", F32, cache),
            helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["b"]),
            helper.make_tensor_value_info("total", TensorProto.INT32, []),
        ],
        [helper.make_tensor_value_info(n, F32, None) for n in ("out", "prk", "prv")],
    )
    binding = gqa.io_binding()
    in_place = [ort.OrtValue.ortvalue_from_numpy(a) for a in (past[0].copy(), past[1].copy())]
    for name, value in zip(("k", "v"), in_place, strict=True):
        binding.bind_ortvalue_input(f"p{name}", value)
        binding.bind_ortvalue_output(f"pr{name}", value)
    binding.bind_cpu_input("qkv", qkv)
    binding.bind_cpu_input("seqlens", lengths)
    binding.bind_cpu_input("total", np.array(lengths.max() + 1, np.int32))
    binding.bind_output("out", "cpu")
    return {
        "MultiHeadAttention + present": lambda: mha.run(None, feeds),
        "GroupQueryAttention in place": lambda: gqa.run_with_iobinding(binding),
    }


def median_ms(runs: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.thread_time()
            run()
            times[name].append(time.thread_time() - start)
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def table(title: str, rows: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(rows.values())))
    lines = [f"| {title} | " + " | ".join(f"{n} µs" for n in names) + " |", "|---|" + "---:|" * len(names)]
    lines += [
        f"| {key} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |" for key, row in rows.items()
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser("bench.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="160x480,160x2000,512x1536,2048x512", help="K×N of W")
    parser.add_argument("--rows", default="1,8,32,64")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=40)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    counts = [int(r) for r in args.rows.split(",")]
    products: dict[str, dict[str, float]] = {}
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        sessions = matmul_sessions((rng.standard_normal((k, n)) * 0.05).astype(np.float32))
        for m in counts:
            x = rng.standard_normal((m, k)).astype(np.float32)
            runs = {name: (lambda s=s, x=x: s.run(None, {"x": x})) for name, s in sessions.items()}
            products[f"M {m}, K {k}, N {n}"] = median_ms(runs, args.repeats)
    attention = {
        f"{rows} rows": median_ms(attention_runs(rows, args.heads, args.head_dim, args.slots), args.repeats)
        for rows in counts
    }
    print(f"1 thread, median CPU time of {args.repeats} runs, interleaved\n")
    print(table("matrix product", products))
    print()
    print(table(f"self-attention, {args.heads} heads × {args.head_dim}, {args.slots} slots", attention))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
