"""The graph transformations behind the variants: fp32 ONNX in, int8 / fp16 / optimized ONNX out.

Each function takes one fp32 graph as `prepare` returns it and returns the variant's graph with
its weights inline; none of them needs torch. What each one does to the graph is reported by
`op_changes` (node counts per op type, before → after), which the variant's manifest records.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

# int8: signed per-channel weights (u8×s8 takes onnxruntime's fast integer kernels; per-channel
# scales cut the error for nothing); the settings compared: docs/variants.md.
INT8_OPTIONS: dict[str, Any] = {
    "weight_type": QuantType.QInt8,
    "per_channel": True,
    "reduce_range": False,
    # The MatMuls only: they hold the weights and the time. The embedding Gathers stay fp32 (a
    # quantized table would only save space), and a MatMul of two activations (QKᵀ, PV) is left
    # alone by dynamic quantization anyway (MatMulConstBOnly, its default).
    "op_types_to_quantize": ["MatMul"],
}

# fp16 for GPU. These ops run in fp32 between Casts: layer norm (mean and variance over d_model),
# softmax (sums of exponentials; masked scores are -65504 in fp16) and the final log-softmax over
# the vocabulary, whose float32 output the contract asks for anyway. LayerNormalization is one op
# at opset 18, so no ReduceMean/Pow/Sqrt pieces of a decomposed one need blocking. Everything
# else (weights, caches, memory, attention maps) is float16. The block list cuts the error
# (docs/variants.md).
FP16_BLOCKED_OPS = ("LayerNormalization", "Softmax", "LogSoftmax")
FP16_FLOAT32_OUTPUTS = ("log_probs",)

# Offline optimisation: onnxruntime's EXTENDED level, saved. It folds the 1/√Dh Div into the score
# MatMul (FusedMatMul), fuses residual Add + LayerNormalization where its rules match
# (SkipLayerNormalization) and folds the remaining shape arithmetic; exact up to float rounding.
# EXTENDED output is for the execution provider it was saved with (CPU here); ALL would add
# CPU-layout-specific nodes and is not meant to be saved. The gain is session load time, not run
# time: onnxruntime makes the same fusions when it loads the fp32 graphs at its default level (ALL).
# The figures, and onnxruntime's transformer optimizer tried instead: docs/variants.md.
OPTIMIZED_PROVIDER = "CPUExecutionProvider"


def prepare(path: Path) -> onnx.ModelProto:
    """An fp32 graph of the model directory, ready to transform: weights loaded and inline,
    constants folded and shapes inferred (onnxruntime's quantization pre-processing).

    Folding matters: the exported graphs reference each stored weight W and transpose it in the
    graph (export.onnx.weights), and dynamic quantization only quantizes a MatMul whose weight is
    an initializer. Symbolic shape inference is skipped: onnx's own suffices for these graphs.
    """
    model = onnx.load(str(path))  # resolves the external data, i.e. reads model.safetensors
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name
        quant_pre_process(model, out, skip_symbolic_shape=True)
        return onnx.load(str(out))


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 quantization of the weight MatMuls (MatMulInteger), every activation row
    quantized on its own (`quantize_rows_apart`)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(model, out, **INT8_OPTIONS)
        return quantize_rows_apart(onnx.load(str(out)))


# Per-row activation quantization, replacing DynamicQuantizeLinear (one scale for the whole batch):
# each row gets scale max |x| / 127 and zero point 128, so a sentence decodes bit-identically alone
# and in any batch, the scheduler's promise. Why, its cost and what was tried: docs/variants.md.
_ROW_CONSTANTS: dict[str, np.ndarray] = {
    "int8_rows/last_axis": np.array([-1], np.int64),
    "int8_rows/127": np.array(127.0, np.float32),
    "int8_rows/128": np.array(128.0, np.float32),
    "int8_rows/tiny": np.array(1e-30, np.float32),  # an all-zero row: scale > 0, quantized to 128s
    "int8_rows/zero_point": np.array(128, np.uint8),
}


def quantize_rows_apart(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each DynamicQuantizeLinear(x) → (q, scale, zero_point) replaced by per-row symmetric
    quantization with the same outputs: scale (…, 1) = max |x| / 127 over the last axis,
    q = round(x / scale) + 128 as uint8, zero_point 128. Downstream nodes are unchanged: the scale's
    Mul with the weight's per-channel scale broadcasts to (…, N)."""
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        (x,), (q, scale, zero_point) = node.input, node.output
        at = f"{q}/rows"  # q is unique: a prefix for the intermediate names
        nodes += [
            helper.make_node("Abs", [x], [f"{at}/abs"]),
            helper.make_node("ReduceMax", [f"{at}/abs", "int8_rows/last_axis"], [f"{at}/max"], keepdims=1),
            helper.make_node("Max", [f"{at}/max", "int8_rows/tiny"], [f"{at}/range"]),
            helper.make_node("Div", [f"{at}/range", "int8_rows/127"], [scale]),
            helper.make_node("Div", ["int8_rows/127", f"{at}/range"], [f"{at}/inverse"]),
            helper.make_node("Mul", [x, f"{at}/inverse"], [f"{at}/scaled"]),
            # |scaled| ≤ 127 up to rounding error, so the rounded value + 128 is within 1 … 255
            helper.make_node("Round", [f"{at}/scaled"], [f"{at}/rounded"]),
            helper.make_node("Add", [f"{at}/rounded", "int8_rows/128"], [f"{at}/shifted"]),
            helper.make_node("Cast", [f"{at}/shifted"], [q], to=TensorProto.UINT8),
            helper.make_node("Identity", ["int8_rows/zero_point"], [zero_point]),
        ]
    if len(nodes) == len(model.graph.node):
        return model
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in _ROW_CONSTANTS.items())
    return model


# int8 for the decoder step: onnxruntime's MatMulNBits, 8-bit weights in blocks of WEIGHT_BLOCK
# along K (one scale per block and output column), accuracy_level 4 = int8 products with each
# activation row quantized per block by the kernel itself. One node per MatMul where the
# DynamicQuantizeLinear path needs ten, and each row's result is its own: a sentence decodes the
# same alone and in any batch. It wins at the decoder step's small row counts and loses at the
# encoder's many tokens (docs/variants.md), so only the step uses it.
WEIGHT_BLOCK = 32
NBITS_ACCURACY_LEVEL = 4


def quantize_weight_blocks(model: onnx.ModelProto, block: int = WEIGHT_BLOCK) -> onnx.ModelProto:
    """Every MatMul whose second input is an fp32 initializer W (K, N) → MatMulNBits (bits 8):
    per output column and block of `block` rows of W, scale = max |w| / 127 and
    q = round(w / scale) + 128 (uint8, the kernel's default zero point 128); K padded with zeros
    to whole blocks. W itself is dropped when nothing else reads it."""
    weights = {t.name: t for t in model.graph.initializer}
    readers = Counter(name for node in model.graph.node for name in node.input)
    nodes, dropped, added = [], set(), []
    for node in model.graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or w.data_type != TensorProto.FLOAT or len(w.dims) != 2:
            nodes.append(node)
            continue
        matrix = numpy_helper.to_array(w).astype(np.float32)
        k, n = matrix.shape
        blocks = -(-k // block)
        padded = np.zeros((blocks * block, n), np.float32)
        padded[:k] = matrix
        columns = padded.T.reshape(n, blocks, block)  # (N, blocks, block): column n's blocks in order
        scale = np.abs(columns).max(axis=-1) / 127
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero block: any scale
        q = (np.clip(np.round(columns / scale[..., None]), -127, 127) + 128).astype(np.uint8)
        base = f"{node.input[1]}/q8b{block}"
        added += [
            numpy_helper.from_array(q, f"{base}/weights"),
            numpy_helper.from_array(scale, f"{base}/scales"),
        ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{base}/weights", f"{base}/scales"],
                list(node.output),
                domain="com.microsoft",
                K=k,
                N=n,
                bits=8,
                block_size=block,
                accuracy_level=NBITS_ACCURACY_LEVEL,
            )
        )
        readers[w.name] -= 1
        if readers[w.name] == 0:
            dropped.add(w.name)
    if not added:
        return model
    del model.graph.node[:]
    model.graph.node.extend(_biases_folded(nodes, weights, {o.name for o in model.graph.output}))
    kept = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, *added])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _biases_folded(
    nodes: list[onnx.NodeProto], weights: dict[str, onnx.TensorProto], outputs: set[str]
) -> list[onnx.NodeProto]:
    """Each Add of a 1-D fp32 initializer (N,) to a MatMulNBits output that nothing else reads
    becomes that node's bias input: one node fewer per biased projection (a node costs a few
    microseconds at the decoder step's sizes, about what the addition itself costs)."""
    readers = Counter(name for node in nodes for name in node.input)
    producers = {out: node for node in nodes for out in node.output}
    folded: set[int] = set()
    for node in nodes:
        if node.op_type != "Add":
            continue
        for x, b in (tuple(node.input), tuple(node.input)[::-1]):
            matmul, bias = producers.get(x), weights.get(b)
            if (
                matmul is not None
                and matmul.op_type == "MatMulNBits"
                and len(matmul.input) == 3
                and bias is not None
                and bias.data_type == TensorProto.FLOAT
                and list(bias.dims) == [_attribute(matmul, "N")]
                and readers[x] == 1
                and x not in outputs
            ):
                matmul.input.extend(["", "", b])  # zero_points, g_idx: none
                matmul.output[0] = node.output[0]
                folded.add(id(node))
                break
    return [node for node in nodes if id(node) not in folded]


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next(int(a.i) for a in node.attribute if a.name == name)


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 weights and activations, except the blocked ops and the float32 outputs."""
    converted: onnx.ModelProto = convert_float_to_float16(
        model, keep_io_types=list(FP16_FLOAT32_OUTPUTS), op_block_list=list(FP16_BLOCKED_OPS)
    )
    # The converter casts an initializer back to float32 once per blocked consumer, each time
    # under the same node and output name: one initializer feeding several blocked ops (identical
    # tensors are stored once, e.g. the zero biases of a freshly initialised model) would then be
    # produced twice, which onnxruntime refuses. Identical copies of a node are one node.
    seen: set[bytes] = set()
    nodes = []
    for node in converted.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            nodes.append(node)
    if len(nodes) < len(converted.graph.node):
        del converted.graph.node[:]
        converted.graph.node.extend(nodes)
    return converted


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's EXTENDED graph optimisations for OPTIMIZED_PROVIDER, applied offline."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=[OPTIMIZED_PROVIDER])
        return onnx.load(options.optimized_model_filepath)


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    """Nodes per op type."""
    return Counter(n.op_type for n in model.graph.node)


def op_changes(before: Counter[str], after: Counter[str]) -> dict[str, Any]:
    """Node counts of two versions of a graph: in total, and of each op type whose count changed."""
    changed = {op: [before[op], after[op]] for op in sorted(before | after) if before[op] != after[op]}
    return {"nodes": [before.total(), after.total()], "ops": changed}


def initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    """How many initializers of each element type ("FLOAT16": 54, "FLOAT": 18, ...)."""
    return dict(
        sorted(Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer).items())
    )
