"""Export a checkpoint to the three ONNX graphs of docs/model-directory.md.

    encoder.onnx       src_ids, src_mask → memory, cross_k, cross_v            (once per request)
    decoder_step.onnx  newest token + KV cache per layer → log_probs, new_k/v (once per token)
    attention.onnx     teacher-forced pass → log_probs and every attention map (Attend RPC)

The wrappers only arrange the model's own methods (`encode`, `cross_kv`, `embed`, `decode`,
`DecoderLayer.step`, `logits`); none of the math is written twice. After
tracing, the graphs' weights are pointed into `model.safetensors` (see `export.onnx.weights`),
so the weights exist once in a model directory. The graphs' signatures and example inputs (the
contract every graph is traced and verified against) are export.onnx.contract's.

Exporter: the TorchScript one (`dynamo=False`), on purpose. Both work for these graphs (the
dynamo one handles an empty cache with `Dim(min=0)`), but the dynamo exporter is much slower per
graph (docs/measured-choices.md), which decides whether the export tests run in seconds; it also
needs `onnxscript`. The TorchScript exporter's known pitfall — it silently drops inputs the
computation does not use — cannot bite unnoticed: every contract input feeds the computation (the
masks are used as given, never recomputed from pad ids) and `trace_graph` refuses a graph whose
inputs or outputs differ from the contract. torch is pinned (==2.13.0); when the TorchScript
exporter goes away, only `trace_graph` changes.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.model import Attentions, Transformer, causal_mask
from export.onnx.contract import TRACE_SIZES, VERIFY_SIZES, example_inputs
from export.onnx.weights import SafetensorsIndex, link_external_weights
from service.modeldir.manifest import GraphSpec, check_graph

OPSET = 18  # ≥ 17 for LayerNormalization as one op
EXPORTER_KIND = "torchscript"


# ---------------------------------------------------------------------------------------------
# The graphs as modules


class EncoderGraph(nn.Module):
    """src_ids, src_mask (B, S) → memory (B, S, D), cross_k, cross_v (L, B, H, S, Dh)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        memory = self.model.encode(src_ids, src_mask[:, None, None, :])
        kv = self.model.cross_kv(memory)
        return memory, torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


class DecoderStepGraph(nn.Module):
    """One decoder step for a running batch, over a self-attention KV cache the caller owns.

    Each row's new token is embedded at its own position; each layer (`DecoderLayer.step`)
    attends over that layer's real cache slots (`self_mask`) plus the token itself, and over the
    real source tokens (`src_mask`). The cache is only read: the token's K/V of every layer come
    out as new_k/new_v for the caller to write into a free slot. The cache arrives one input per
    layer and K/V (past_k_0, past_v_0, past_k_1, …), so a caller's (L, rows, H, slots, Dh) buffer
    is fed as contiguous views, without the copy a stacked input's per-layer Gather would make.
    cache_len may be 0.

    forward(tokens (B, 1), positions (B,), self_mask (B, T), src_mask (B, S),
            past_k_0, past_v_0, …  (B, H, T, Dh), cross_k_0, cross_v_0, …  (B, H, S, Dh))
        → log_probs (B, V), new_k, new_v (L, B, H, Dh)
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: Tensor, positions: Tensor, self_mask: Tensor, src_mask: Tensor, *kv: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        layers = model.decoder_stack
        past, cross = kv[: 2 * len(layers)], kv[2 * len(layers) :]
        y = model.embed(model.tgt_embed, tokens, positions[:, None])  # (B, 1, D)
        self_mask_4d = self_mask[:, None, None, :]  # (B, 1, 1, T)
        src_mask_4d = src_mask[:, None, None, :]  # (B, 1, 1, S)
        new_k, new_v = [], []
        for i, layer in enumerate(layers):
            y, k, v = layer.step(
                y, past[2 * i], past[2 * i + 1], self_mask_4d, cross[2 * i], cross[2 * i + 1], src_mask_4d
            )
            new_k.append(k[:, :, 0])  # (B, H, Dh)
            new_v.append(v[:, :, 0])
        logits = model.logits(model.decoder_norm(y)[:, 0])  # (B, V)
        return F.log_softmax(logits, dim=-1), torch.stack(new_k), torch.stack(new_v)


class AttentionGraph(nn.Module):
    """Teacher-forced pass → log_probs (B, T, V) and the attention probabilities of every layer.

    `Transformer.attention_maps` recomputes the masks from pad ids; this graph takes them as
    inputs (the contract does), so it composes `encode`/`decode`/`logits` like that method does.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, src_ids: Tensor, src_mask: Tensor, tgt_ids: Tensor, tgt_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        model = self.model
        attentions = Attentions([], [], [])
        src_mask_4d = src_mask[:, None, None, :]
        tgt_mask_4d = causal_mask(tgt_ids.size(1), tgt_ids.device) & tgt_mask[:, None, None, :]
        memory = model.encode(src_ids, src_mask_4d, attentions)
        hidden = model.decode(memory, src_mask_4d, tgt_ids, tgt_mask_4d, attentions)
        return (
            F.log_softmax(model.logits(hidden), dim=-1),
            torch.stack(attentions.encoder_self),
            torch.stack(attentions.decoder_self),
            torch.stack(attentions.cross),
        )


GRAPH_MODULES: dict[str, type[nn.Module]] = {
    "encoder": EncoderGraph,
    "decoder_step": DecoderStepGraph,
    "attention": AttentionGraph,
}


# ---------------------------------------------------------------------------------------------
# Tracing, weight linking, verification


def trace_graph(module: nn.Module, spec: GraphSpec, example: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Export `module` (in eval mode) with the TorchScript exporter and check its signature."""
    module.eval()  # dropout off: a wrapper in training mode silently disagrees with the reference
    args = tuple(torch.from_numpy(example[t.name]) for t in spec.inputs)
    dynamic_axes = {
        t.name: {axis: d for axis, d in enumerate(t.shape) if isinstance(d, str)}
        for t in (*spec.inputs, *spec.outputs)
    }
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        path = Path(tmp) / spec.file
        # Known and harmless here: the deprecation notice of this exporter, and the tracer's note
        # that √Dh becomes a constant (Dh is fixed by the config).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            args,
            path,
            dynamo=False,
            opset_version=OPSET,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=dynamic_axes,
        )
        model = onnx.load(str(path))
    _set_signature(model, spec)
    return model


def _set_signature(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Check the exported inputs/outputs against the contract and write its exact shapes."""
    for side, values, wanted in (
        ("inputs", model.graph.input, spec.inputs),
        ("outputs", model.graph.output, spec.outputs),
    ):
        names = [v.name for v in values]
        if names != [t.name for t in wanted]:
            contract = [t.name for t in wanted]
            raise RuntimeError(f"{spec.file}: exported {side} {names} are not the contract's {contract}")
        for value, t in zip(values, wanted, strict=True):
            tensor_type = value.type.tensor_type
            if tensor_type.elem_type != onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)):
                raise RuntimeError(
                    f"{spec.file}: {t.name} has ONNX element type {tensor_type.elem_type}, not {t.dtype}"
                )
            tensor_type.shape.ClearField("dim")
            for d in t.shape:
                dim = tensor_type.shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                else:
                    dim.dim_param = d


def _strip_provenance(model: onnx.ModelProto) -> None:
    """Drop doc strings and per-node metadata: they may hold source paths, and a re-export must
    be byte-identical."""
    model.doc_string = ""
    model.graph.doc_string = ""
    del model.metadata_props[:]
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]


def export_graph(
    model: Transformer, name: str, spec: GraphSpec, out_dir: Path, weights: SafetensorsIndex
) -> Path:
    """Trace graph `name`, link its weights into `weights` (which must lie in `out_dir`), write it."""
    if weights.path.parent.resolve() != out_dir.resolve():
        raise ValueError(f"{weights.path}: the weight file must be next to the graphs in {out_dir}")
    example = example_inputs(model.cfg, spec, TRACE_SIZES)
    onnx_model = trace_graph(GRAPH_MODULES[name](model), spec, example)
    link_external_weights(
        onnx_model, weights, location=weights.path.name, allowed_inline=[model.positions.numpy()]
    )
    _strip_provenance(onnx_model)
    path = out_dir / spec.file
    path.write_bytes(onnx_model.SerializeToString(deterministic=True))
    onnx.checker.check_model(str(path))  # also resolves every external-data reference
    return path


def graph_differences(
    model: Transformer, name: str, spec: GraphSpec, path: Path, sizes: dict[str, int], seed: int = 1
) -> dict[str, float]:
    """Max abs difference per output between onnxruntime (CPU) running `path` and the PyTorch
    wrapper, on random inputs of `sizes` whose last row is padded (see `example_inputs`)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check_graph(spec, session)
    example = example_inputs(model.cfg, spec, sizes, seed=seed)
    got = session.run(None, example)
    with torch.no_grad():
        wrapper = GRAPH_MODULES[name](model).eval()
        want = wrapper(*(torch.from_numpy(example[t.name]) for t in spec.inputs))
    return {
        t.name: float(np.max(np.abs(g - w.numpy()))) for t, g, w in zip(spec.outputs, got, want, strict=True)
    }


def verify_graph(model: Transformer, name: str, spec: GraphSpec, path: Path, atol: float = 1e-4) -> None:
    """Load `path` with onnxruntime, check its signature and compare one run with PyTorch, at
    sizes other than the traced ones (and an empty cache).

    Raises:
        RuntimeError: the outputs differ from the PyTorch wrapper by more than `atol`.
    """
    for output, diff in graph_differences(model, name, spec, path, VERIFY_SIZES).items():
        if not diff <= atol:
            raise RuntimeError(f"{path}: output {output} differs from PyTorch by {diff:.2e} (> {atol})")
