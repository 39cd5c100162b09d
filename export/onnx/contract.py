"""The contract of the three graphs (docs/model-directory.md, "Graphs"): their signatures for a
model config, and random inputs that satisfy them. numpy and service.modeldir.manifest only, no torch: the
exporter (export.onnx.export) traces and verifies against it, and the variants
(export.variants, export.variants.checks) are built and checked against it where torch is not
installed (the Docker images' builder stage).
"""

from __future__ import annotations

import numpy as np

from export.model_config import TransformerConfig
from service.modeldir.manifest import GraphSpec, TensorSpec

GRAPH_FILES = {"encoder": "encoder.onnx", "decoder_step": "decoder_step.onnx", "attention": "attention.onnx"}


def _tensor(name: str, dtype: str, *shape: int | str) -> TensorSpec:
    return TensorSpec(name, dtype, shape)


def graph_specs(cfg: TransformerConfig, float_dtype: str = "float32") -> dict[str, GraphSpec]:
    """The graphs' signatures for a model config (docs/model-directory.md, "Graphs"); `V` is the
    target vocabulary (the source one only sizes the encoder's table, inside the graph).

    Args:
        float_dtype: of the float tensors, "float16" for the fp16 variant; log-probabilities
            are float32 in every variant.
    """
    L, L_enc, H, Dh, D, V = (
        cfg.n_decoder_layers,
        cfg.n_encoder_layers,
        cfg.n_heads,
        cfg.d_k,
        cfg.d_model,
        cfg.vocab_size,
    )
    f, f32, i64, bool_ = float_dtype, "float32", "int64", "bool"
    t = _tensor
    src = [t("src_ids", i64, "batch", "src_len"), t("src_mask", bool_, "batch", "src_len")]
    cross = [t(n, f, L, "batch", H, "src_len", Dh) for n in ("cross_k", "cross_v")]
    return {
        "encoder": GraphSpec(
            GRAPH_FILES["encoder"], (*src,), (t("memory", f, "batch", "src_len", D), *cross)
        ),
        "decoder_step": GraphSpec(
            GRAPH_FILES["decoder_step"],
            (
                t("tokens", i64, "batch", 1),
                t("positions", i64, "batch"),
                t("self_mask", bool_, "batch", "cache_len"),
                t("src_mask", bool_, "batch", "src_len"),
                # One input per layer and K/V: a caller's (L, rows, H, slots, Dh) cache buffer
                # is fed as contiguous per-layer views (docs/model-directory.md).
                *(t(f"past_{kv}_{i}", f, "batch", H, "cache_len", Dh) for i in range(L) for kv in "kv"),
                *(t(f"cross_{kv}_{i}", f, "batch", H, "src_len", Dh) for i in range(L) for kv in "kv"),
            ),
            (
                t("log_probs", f32, "batch", V),
                t("new_k", f, L, "batch", H, Dh),
                t("new_v", f, L, "batch", H, Dh),
            ),
        ),
        "attention": GraphSpec(
            GRAPH_FILES["attention"],
            (*src, t("tgt_ids", i64, "batch", "tgt_len"), t("tgt_mask", bool_, "batch", "tgt_len")),
            (
                t("log_probs", f32, "batch", "tgt_len", V),
                t("encoder_attention", f, L_enc, "batch", H, "src_len", "src_len"),
                t("decoder_attention", f, L, "batch", H, "tgt_len", "tgt_len"),
                t("cross_attention", f, L, "batch", H, "tgt_len", "src_len"),
            ),
        ),
    }


def in_place_step_spec(cfg: TransformerConfig, float_dtype: str = "float32") -> GraphSpec:
    """The decoder step that writes the new token's keys/values into the cache itself
    (docs/model-directory.md, "In-place decoder step"): the int8 and optimized variants' step.

    The caller binds each layer's whole cache buffer `[batch, H, slots, Dh]` as `past_{k,v}_{l}`
    and the same memory as `present_{k,v}_{l}`; row b's real slots are 0 … positions[b] − 1 and
    the graph writes slot positions[b]. `total_length` is max(positions) + 1.
    """
    L, H, Dh, V = cfg.n_decoder_layers, cfg.n_heads, cfg.d_k, cfg.vocab_size
    f, t = float_dtype, _tensor
    cache = [f"{kv}_{i}" for i in range(L) for kv in "kv"]
    return GraphSpec(
        GRAPH_FILES["decoder_step"],
        (
            t("tokens", "int64", "batch", 1),
            t("positions", "int32", "batch"),
            t("total_length", "int32"),
            t("src_mask", "bool", "batch", "src_len"),
            *(t(f"past_{name}", f, "batch", H, "slots", Dh) for name in cache),
            *(t(f"cross_{kv}_{i}", f, "batch", H, "src_len", Dh) for i in range(L) for kv in "kv"),
        ),
        (
            t("log_probs", "float32", "batch", V),
            *(t(f"present_{name}", f, "batch", H, "slots", Dh) for name in cache),
        ),
    )


# Sizes of the inputs the graphs are traced with, and of the run that verifies each exported graph:
# all different from each other and from the fixed dims, so that a size the tracer baked in by
# mistake shows up as a wrong result; verification also covers the empty cache of a first step.
TRACE_SIZES = {"batch": 2, "src_len": 5, "tgt_len": 4, "cache_len": 3}
VERIFY_SIZES = {"batch": 3, "src_len": 7, "tgt_len": 6, "cache_len": 0}


def example_inputs(
    cfg: TransformerConfig, spec: GraphSpec, sizes: dict[str, int], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs that satisfy `spec` at `sizes` (batch, src_len, tgt_len, cache_len).

    The last row (when batch > 1) is padded: its last source/target slot, and (self_mask) every
    other cache slot from the first on, so that real and free slots alternate as in a cache whose
    rows reuse freed slots; with one slot, that row's whole cache is masked (its new token alone
    is attended). Masked cache slots hold random values like the real ones: they must not
    matter. Each row's position is its number of real cache slots.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)
        if t.dtype == "bool":
            mask = np.ones(shape, dtype=bool)
            if shape[0] > 1 and t.name == "self_mask":
                mask[-1, ::2] = False
            elif shape[0] > 1:
                mask[-1, -1] = False
            out[t.name] = mask
        elif t.name == "positions":
            out[t.name] = np.zeros(shape, dtype=np.int64)  # set below, from self_mask
        elif t.dtype == "int64":
            vocab = cfg.src_vocab_size if t.name == "src_ids" else cfg.vocab_size
            ids = rng.integers(4, vocab, size=shape, dtype=np.int64)
            if t.name == "tgt_ids":
                ids[:, 0] = cfg.bos_id
            out[t.name] = ids
        else:
            out[t.name] = rng.standard_normal(shape).astype(t.dtype)
    if "positions" in out:
        out["positions"] = out["self_mask"].sum(axis=1, dtype=np.int64)
    return out
