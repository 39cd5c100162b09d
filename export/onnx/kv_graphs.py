"""The device KV cache's row and slot edits as tiny ONNX graphs: `python -m export.onnx.kv_graphs`.

On CUDA the server keeps each batch's KV cache in device memory between decoder steps
(service/engine/device_kv_cache.py). Its edits must then run on the device too, and onnxruntime is the
only thing there that can run them (the server depends on neither torch nor CuPy). So they are
graphs, one file per edit and float type, written into service/engine/kv_graphs/ and committed (a few
hundred bytes each; the server does not depend on the onnx package that builds them). They work on
the stacked caches, (L, R, H, T, Dh), so that one file serves any model:

- `append`: a decoder step's new keys/values (L, R, H, Dh) become each row's last slot:
  past (…, T, Dh) → (…, T + 1, Dh). Slots are right-aligned: row r's real ones are its last
  length[r], so every row's new slot is the same column.
- `select`: the rows that go on, in order, repeats allowed (finished rows leave, beams branch),
  with the slot columns no remaining row needs dropped from the left and the source columns
  beyond the longest remaining source dropped from the right.
- `join`: new rows after the others: an empty past (zeros, masked), and their encoder
  cross-attention keys/values, the sources padded with zeros to a common length.

tests/export/test_kv_graphs.py rebuilds them and compares with the committed files, and
tests/service/test_device_kv_cache.py checks the cache built on them against the host one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OUT_DIR = Path(__file__).resolve().parents[2] / "service" / "engine" / "kv_graphs"
FLOAT_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
EDITS = ("append", "select", "join")
OPSET = 17
_CACHE = ["L", "R", "H", "T", "Dh"]
_INT64_MAX = np.iinfo(np.int64).max


def _tensor(name: str, elem: int, shape: Sequence[str | int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _int64(name: str, values: Sequence[int]) -> onnx.NodeProto:
    value = helper.make_tensor(name, TensorProto.INT64, [len(values)], list(values))
    return helper.make_node("Constant", [], [name], value=value)


def append_graph(elem: int) -> onnx.GraphProto:
    nodes = [_int64("slot_axis", [3])]
    for kv in ("k", "v"):
        nodes += [
            helper.make_node("Unsqueeze", [f"new_{kv}", "slot_axis"], [f"slot_{kv}"]),
            helper.make_node("Concat", [f"past_{kv}", f"slot_{kv}"], [f"out_{kv}"], axis=3),
        ]
    inputs = [_tensor(f"past_{kv}", elem, _CACHE) for kv in ("k", "v")]
    inputs += [_tensor(f"new_{kv}", elem, ["L", "R", "H", "Dh"]) for kv in ("k", "v")]
    outputs = [_tensor(f"out_{kv}", elem, ["L", "R2", "H", "T2", "Dh"]) for kv in ("k", "v")]
    return helper.make_graph(nodes, "kv_append", inputs, outputs)


def select_graph(elem: int) -> onnx.GraphProto:
    nodes = [_int64("zero", [0]), _int64("last", [_INT64_MAX]), _int64("axis", [3])]
    for name in ("past_k", "past_v", "cross_k", "cross_v"):
        nodes.append(helper.make_node("Gather", [name, "rows"], [f"{name}_rows"], axis=1))
    for name in ("past_k", "past_v"):  # the slots from `first_slot` on
        window = [f"{name}_rows", "first_slot", "last", "axis"]
        nodes.append(helper.make_node("Slice", window, [f"out_{name}"]))
    for name in ("cross_k", "cross_v"):  # the sources up to `sources`
        window = [f"{name}_rows", "zero", "sources", "axis"]
        nodes.append(helper.make_node("Slice", window, [f"out_{name}"]))
    inputs = [_tensor(name, elem, _CACHE) for name in ("past_k", "past_v")]
    inputs += [_tensor(name, elem, ["L", "R", "H", "S", "Dh"]) for name in ("cross_k", "cross_v")]
    inputs += [
        _tensor("rows", TensorProto.INT64, ["R2"]),
        _tensor("first_slot", TensorProto.INT64, [1]),
        _tensor("sources", TensorProto.INT64, [1]),
    ]
    outputs = [_tensor(f"out_{name}", elem, ["L", "R2", "H", "T2", "Dh"]) for name in ("past_k", "past_v")]
    outputs += [_tensor(f"out_{name}", elem, ["L", "R2", "H", "S2", "Dh"]) for name in ("cross_k", "cross_v")]
    return helper.make_graph(nodes, "kv_select", inputs, outputs)


def join_graph(elem: int) -> onnx.GraphProto:
    zero = helper.make_tensor("zero", elem, [1], [0.0])
    nodes = [helper.make_node("ConstantOfShape", ["new_past_shape"], ["new_past"], value=zero)]
    for kv in ("k", "v"):
        nodes += [
            helper.make_node("Concat", [f"past_{kv}", "new_past"], [f"out_past_{kv}"], axis=1),
            helper.make_node("Pad", [f"cross_{kv}", "cross_pads"], [f"cross_{kv}_padded"]),
            helper.make_node("Pad", [f"new_cross_{kv}", "new_cross_pads"], [f"new_cross_{kv}_padded"]),
            helper.make_node(
                "Concat", [f"cross_{kv}_padded", f"new_cross_{kv}_padded"], [f"out_cross_{kv}"], axis=1
            ),
        ]
    inputs = [_tensor(f"past_{kv}", elem, _CACHE) for kv in ("k", "v")]
    inputs += [_tensor(f"cross_{kv}", elem, ["L", "R", "H", "S", "Dh"]) for kv in ("k", "v")]
    inputs += [_tensor(f"new_cross_{kv}", elem, ["L", "M", "H", "S_new", "Dh"]) for kv in ("k", "v")]
    inputs += [
        _tensor("new_past_shape", TensorProto.INT64, [5]),  # (L, M, H, T, Dh)
        _tensor("cross_pads", TensorProto.INT64, [10]),  # ONNX Pad: the 5 begins, then the 5 ends
        _tensor("new_cross_pads", TensorProto.INT64, [10]),
    ]
    outputs = [_tensor(f"out_past_{kv}", elem, ["L", "R2", "H", "T", "Dh"]) for kv in ("k", "v")]
    outputs += [_tensor(f"out_cross_{kv}", elem, ["L", "R2", "H", "S2", "Dh"]) for kv in ("k", "v")]
    return helper.make_graph(nodes, "kv_join", inputs, outputs)


_BUILDERS = {"append": append_graph, "select": select_graph, "join": join_graph}


def build(edit: str, float_type: str) -> bytes:
    """The serialized model of one edit for one float type (deterministic)."""
    graph = _BUILDERS[edit](FLOAT_TYPES[float_type])
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="translator")
    model.ir_version = 8  # onnxruntime ≥ 1.14 reads it
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString(deterministic=True)


def file_name(edit: str, float_type: str) -> str:
    return f"{float_type}_{edit}.onnx"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.onnx.kv_graphs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for float_type in FLOAT_TYPES:
        for edit in EDITS:
            (args.out / file_name(edit, float_type)).write_bytes(build(edit, float_type))
    print(f"wrote {len(FLOAT_TYPES) * len(EDITS)} graphs to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
