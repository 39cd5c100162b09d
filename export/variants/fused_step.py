"""The decoder step rebuilt from fused onnxruntime kernels, writing its cache in place.

The traced decoder step (export.onnx.export) spells attention out in a few dozen small ops per layer
(transposes, reshapes, masks, two matrix products, a softmax, the cache/new-token split); at the
default model's size a step is dominated by the cost of running ~160 nodes (~460 in int8), not by
arithmetic. This module writes the same function directly with onnxruntime's contrib kernels:

- `GroupQueryAttention` for self-attention, over the caller's cache buffer, into which it writes
  the new token's keys/values at each row's position (the in-place contract,
  `export.onnx.contract.in_place_step_spec`): no new_k/new_v outputs to copy back, no mask to
  build, and no copy of the past into a "present" output as MultiHeadAttention makes;
- `MultiHeadAttention` for cross-attention (the encoder's K/V fed as (B, H, S, Dh), no transpose);
- `SkipLayerNormalization` for each residual Add + LayerNorm (post-norm) or residual Add + the next
  sublayer's LayerNorm (pre-norm), the projection's bias folded in;
- one packed Q/K/V projection per self-attention; `BiasGelu` / `QuickGelu` for the activations.

Built from the model directory alone (manifest architecture, model.safetensors, and the traced
graph's position table), with numpy and onnx: no torch. `export.variants` checks it against the
traced graph before a variant ships it; the engine runs it through IOBinding
(service/engine/graphs.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.model_config import TransformerConfig
from export.onnx.contract import in_place_step_spec
from export.onnx.weights import SafetensorsIndex
from service.modeldir.manifest import Manifest, TensorSpec

MS = "com.microsoft"
OPSET = 18
IR_VERSION = 9  # what onnxruntime 1.31 reads (onnx 1.23 writes 14 by default)


class _Graph:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs: Any) -> list[str]:
        self._count += 1
        names = (
            [f"{op_type.lower()}_{self._count}_{i}" for i in range(outputs)]
            if isinstance(outputs, int)
            else outputs
        )
        domain = MS if op_type in _CONTRIB else ""
        self.nodes.append(helper.make_node(op_type, inputs, names, domain=domain, **attrs))
        return names

    def one(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, **attrs)[0]


_CONTRIB = {"GroupQueryAttention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "QuickGelu"}


def position_table(traced: onnx.ModelProto, max_positions: int, d_model: int) -> np.ndarray:
    """The sinusoid table the traced graph embeds (inline, (P, D) float32): the very same values."""
    candidates = [numpy_helper.to_array(t) for t in traced.graph.initializer if not t.external_data]
    for node in traced.graph.node:
        if node.op_type == "Constant":
            candidates += [numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"]
    tables = [c for c in candidates if c.shape == (max_positions, d_model) and c.dtype == np.float32]
    if len(tables) != 1:
        raise ValueError(f"the traced decoder step holds {len(tables)} position tables, not one")
    return tables[0]


def build_fused_step(model_dir: Path, manifest: Manifest) -> onnx.ModelProto:
    """The in-place decoder step of the fp32 model in `model_dir`, written with fused kernels."""
    cfg = TransformerConfig.from_dict(dict(manifest.architecture))
    weights = SafetensorsIndex(model_dir / "model.safetensors").arrays()
    traced = onnx.load(str(model_dir / manifest.graphs["decoder_step"].file), load_external_data=False)
    positions = position_table(traced, cfg.max_positions, cfg.d_model)
    g = _Graph()
    d, heads, layers = cfg.d_model, cfg.n_heads, cfg.n_decoder_layers
    eps = cfg.layer_norm_eps
    pre = cfg.norm_placement == "pre"

    def w(name: str) -> np.ndarray:
        return weights[name]

    def linear(x: str, prefix: str, bias: bool = True) -> str:
        """x @ Wᵀ (+ b): torch's (out, in) weight stored transposed for MatMul."""
        out = g.one("MatMul", [x, g.const(f"{prefix}.weight.T", w(f"{prefix}.weight").T)])
        return g.one("Add", [out, g.const(f"{prefix}.bias", w(f"{prefix}.bias"))]) if bias else out

    table_name = "tgt_embed.weight" if "tgt_embed.weight" in weights else "src_embed.weight"
    table = g.const(table_name, w(table_name))
    y = g.one("Gather", [table, "tokens"])  # (B, 1, D)
    if cfg.scale_embeddings:
        y = g.one("Mul", [y, g.const("embed_scale", np.array(math.sqrt(d), np.float32))])
    axis1 = g.const("axis_1", np.array([1], np.int64))
    pos_ids = g.one("Unsqueeze", ["positions", axis1])
    pos = g.one("Gather", [g.const("positions_table", positions), pos_ids])
    y = g.one("Add", [y, pos])

    src_kpm = g.one("Cast", ["src_mask"], to=TensorProto.INT32)  # MultiHeadAttention's key padding mask

    def norm_names(i: int, sub: str) -> tuple[str, str]:
        prefix = f"decoder_layers.{i}.{sub}.norm"
        return g.const(f"{prefix}.weight", w(f"{prefix}.weight")), g.const(
            f"{prefix}.bias", w(f"{prefix}.bias")
        )

    def next_norm(i: int, sub: str) -> tuple[str, str]:
        """The LayerNorm that follows sublayer `sub` of layer i in a pre-norm stack."""
        order = ["self_sublayer", "cross_sublayer", "ffn_sublayer"]
        k = order.index(sub)
        if k < 2:
            return norm_names(i, order[k + 1])
        if i + 1 < layers:
            return norm_names(i + 1, "self_sublayer")
        return (
            g.const("decoder_norm.weight", w("decoder_norm.weight")),
            g.const("decoder_norm.bias", w("decoder_norm.bias")),
        )

    def residual(i: int, sub: str, out: str, skip: str, bias: str) -> tuple[str, str]:
        """(what the next sublayer reads, the residual stream) after sublayer `sub` wrote `out`."""
        if not pre:
            gamma, beta = norm_names(i, sub)
            y = g.one("SkipLayerNormalization", [out, skip, gamma, beta, bias], epsilon=eps)
            return y, y
        gamma, beta = next_norm(i, sub)
        normed, _, _, total = g.op("SkipLayerNormalization", [out, skip, gamma, beta, bias], 4, epsilon=eps)
        return normed, total

    h = y
    if pre:
        gamma, beta = norm_names(0, "self_sublayer")
        h = g.one("LayerNormalization", [y, gamma, beta], axis=-1, epsilon=eps)
    for i in range(layers):
        p = f"decoder_layers.{i}"
        # self-attention: one packed projection; the kernel writes the new K/V into slot
        # positions[b] of the bound cache and attends over slots 0 … positions[b]
        packed_w = np.concatenate([w(f"{p}.self_attn.w_{x}.weight") for x in "qkv"], axis=0).T
        packed_b = np.concatenate([w(f"{p}.self_attn.w_{x}.bias") for x in "qkv"])
        qkv = g.one("MatMul", [h, g.const(f"{p}.self_attn.qkv.weight.T", packed_w)])
        qkv = g.one("Add", [qkv, g.const(f"{p}.self_attn.qkv.bias", packed_b)])
        attn = g.op(
            "GroupQueryAttention",
            [qkv, "", "", f"past_k_{i}", f"past_v_{i}", "positions", "total_length"],
            [f"self_attention_{i}", f"present_k_{i}", f"present_v_{i}"],
            num_heads=heads,
            kv_num_heads=heads,
        )[0]
        out = linear(attn, f"{p}.self_attn.w_o", bias=False)
        bo = g.const(f"{p}.self_attn.w_o.bias", w(f"{p}.self_attn.w_o.bias"))
        h, y = residual(i, "self_sublayer", out, y, bo)
        # cross-attention over the encoder's K/V, (B, H, S, Dh) as the contract feeds them
        qc = linear(h, f"{p}.cross_attn.w_q")
        attn = g.one("MultiHeadAttention", [qc, f"cross_k_{i}", f"cross_v_{i}", "", src_kpm], num_heads=heads)
        out = linear(attn, f"{p}.cross_attn.w_o", bias=False)
        bo = g.const(f"{p}.cross_attn.w_o.bias", w(f"{p}.cross_attn.w_o.bias"))
        h, y = residual(i, "cross_sublayer", out, y, bo)
        # feed-forward
        inner = linear(h, f"{p}.ffn.w_1", bias=False)
        b1 = g.const(f"{p}.ffn.w_1.bias", w(f"{p}.ffn.w_1.bias"))
        if cfg.activation == "gelu":
            inner = g.one("BiasGelu", [inner, b1])
        else:
            inner = g.one("Add", [inner, b1])
            inner = (
                g.one("Relu", [inner]) if cfg.activation == "relu" else g.one("QuickGelu", [inner], alpha=1.0)
            )
        out = linear(inner, f"{p}.ffn.w_2", bias=False)
        b2 = g.const(f"{p}.ffn.w_2.bias", w(f"{p}.ffn.w_2.bias"))
        h, y = residual(i, "ffn_sublayer", out, y, b2)
    # h: the final hidden state (post-norm: the last LayerNorm's output; pre-norm: decoder_norm's)
    if "output_proj.weight" in weights:
        projection = g.const("output_proj.weight.T", w("output_proj.weight").T)
    else:
        projection = g.const(f"{table_name}.T", w(table_name).T)
    logits = g.one("MatMul", [h, projection])
    if "logits_bias" in weights:
        logits = g.one("Add", [logits, g.const("logits_bias", w("logits_bias"))])
    log_probs = g.one("LogSoftmax", [logits], axis=-1)
    g.op("Squeeze", [log_probs, axis1], ["log_probs"])
    spec = in_place_step_spec(cfg)
    graph = helper.make_graph(
        g.nodes, "decoder_step_fused", _values(spec.inputs), _values(spec.outputs), g.initializers
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model)
    return model


def _values(tensors: tuple[TensorSpec, ...]) -> list[onnx.ValueInfoProto]:
    """Graph inputs/outputs for a contract's tensors (float32: the fused step is built in fp32)."""
    elem = helper.np_dtype_to_tensor_dtype
    return [helper.make_tensor_value_info(t.name, elem(np.dtype(t.dtype)), list(t.shape)) for t in tensors]
