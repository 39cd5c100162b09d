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

import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

# int8, measured on the default model (AMD EPYC with AVX-512 VNNI, onnxruntime 1.31): |Δ log p|
# of the reference token vs fp32 on 256 test sentences teacher-forced; decoder step and encoder
# at batch 64, 1 thread, median of 50 and 20 runs:
#   QInt8 per-tensor    mean 1.39e-3  max 0.50   step 3.2 ms  encoder 20 ms
#   QInt8 per-channel   mean 1.18e-3  max 0.34   step 3.0 ms  encoder 19 ms   ← chosen
#   QUInt8 per-tensor   mean 1.30e-3  max 0.40   step 3.6 ms  encoder 31 ms
#   QUInt8 per-channel  mean 1.13e-3  max 0.27   step 4.0 ms  encoder 32 ms
#   QInt8 reduce_range  mean 1.89e-3  max 0.31   step 3.1 ms  encoder 20 ms
#   fp32                                          step 4.4 ms  encoder 37 ms
# Every setting kept greedy BLEU on the 1000 test sentences within 0.03 of fp32 (99.9-100 % of
# the outputs identical). Signed weights with the unsigned activations of dynamic quantization
# (u8×s8) take onnxruntime's fast integer kernels; u8×u8 ran the encoder 1.5× slower for an
# accuracy gain too small to change a translation. Per-channel scales (one per output column of
# each weight) cost nothing and cut the error. reduce_range (7-bit weights) guards against an
# overflow of AVX2's u8×s8 instruction on CPUs without VNNI, at 60 % more error here; the quality
# gate runs on the machine that builds the variant, so such a CPU would fail it loudly rather
# than ship a worse model.
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
# else (weights, caches, memory, attention maps) is float16. On CPU the block list cut the error
# by a third: max |Δ log p| vs fp32, 200 test sentences teacher-forced, 0.017 against 0.026.
FP16_BLOCKED_OPS = ("LayerNormalization", "Softmax", "LogSoftmax")
FP16_FLOAT32_OUTPUTS = ("log_probs",)

# Offline optimisation: onnxruntime's EXTENDED level, saved. It folds the 1/√Dh Div into the score
# MatMul (FusedMatMul), fuses residual Add + LayerNormalization where its rules match
# (SkipLayerNormalization) and folds the remaining shape arithmetic; exact up to float rounding.
# EXTENDED output is for the execution provider it was saved with (CPU here); ALL would add
# CPU-layout-specific nodes and is not meant to be saved. onnxruntime's transformer optimizer
# ("bart" or "bert", opt_level 0) recognised none of our attention subgraphs; it fused every
# residual Add + LayerNormalization and bias Add into SkipLayerNormalization, but then the encoder
# ran slower. Measured (AMD EPYC, 1 thread; step and encoder at batch 64, median; session load
# of the three graphs, median of 7; all in ms):
#                                  decoder step   encoder   load
#   fp32 graphs (ALL at load)          3.9-4.7    36-38    117-126
#   EXTENDED, saved                    3.9-4.4    40-41     44-46   ← chosen
#   transformer optimizer, EXTENDED    3.8-4.3    42-44     45
# so the gain is session load time, not run time: at its default level (ALL) onnxruntime makes
# the same fusions in the fp32 graphs when it loads them. Greedy decoding of the 1000 test
# sentences took 1.30 s with either the fp32 or the EXTENDED graphs (best of 3).
OPTIMIZED_PROVIDER = "CPUExecutionProvider"


def prepare(path: Path) -> onnx.ModelProto:
    """An fp32 graph of the model directory, ready to transform: weights loaded and inline,
    constants folded and shapes inferred (onnxruntime's quantization pre-processing).

    Folding matters: the exported graphs reference each stored weight W and transpose it in the
    graph (export.onnx_weights), and dynamic quantization only quantizes a MatMul whose weight is
    an initializer. Symbolic shape inference is skipped: onnx's own suffices for these graphs.
    """
    model = onnx.load(str(path))  # resolves the external data, i.e. reads model.safetensors
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name
        quant_pre_process(model, out, skip_symbolic_shape=True)
        return onnx.load(str(out))


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 quantization of the weight MatMuls (MatMulInteger + DynamicQuantizeLinear)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(model, out, **INT8_OPTIONS)
        return onnx.load(str(out))


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 weights and activations, except the blocked ops and the float32 outputs."""
    converted: onnx.ModelProto = convert_float_to_float16(
        model, keep_io_types=list(FP16_FLOAT32_OUTPUTS), op_block_list=list(FP16_BLOCKED_OPS)
    )
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
