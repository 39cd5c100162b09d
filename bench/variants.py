"""The decoding loops the KV-cache benchmark compares, each forced to an exact output length.

All four are greedy and run the reference decoder's own search (`service.engine.reference_decoder`), so
the per-step bookkeeping is the same code everywhere; only where a step's log-probabilities come
from differs (`DESCRIPTIONS`). `recompute` is the honest no-cache baseline: it redoes what the
cache saves and nothing more. The model directory has no graph for it (the service never needs
one), so it is exported here, in memory, from the same checkpoint with the project's exporter
settings (`export.onnx.export`).

Forced length: the end token's log-probability is set to -inf before the search sees it (the
search does the same to padding and the start token through `SearchOptions.never_ids`) and the
length limit is N, so every row decodes exactly N tokens. The search and its defaults are
untouched: only these graph wrappers ban the token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import torch.nn.functional as F
from torch import Tensor, nn

from export.checkpoint import load_model
from export.model import Transformer, causal_mask

# Private helpers, on purpose: the benchmark must drive the reference decoder's own search loop,
# so that every variant pays the same bookkeeping, and trace with the exporter's own settings.
# The smoke test (tests/bench) breaks loudly if they change.
from export.onnx.contract import TRACE_SIZES, example_inputs
from export.onnx.export import trace_graph
from service.engine.graphs import Attention, OnnxGraphs, StepOutput, pad_ids
from service.engine.reference_decoder import (
    Prefixes,
    run_search,
    start_states,
    translate_ids,
    translate_ids_without_cache,
)
from service.modeldir.manifest import GraphSpec, TensorSpec

Variant = Literal["cached", "recompute", "attention", "replay"]
VARIANTS: tuple[Variant, ...] = ("cached", "recompute", "attention", "replay")
BASELINES: tuple[Variant, ...] = VARIANTS[1:]  # what the cache is compared against
LABELS: dict[str, str] = {
    "cached": "KV cache",
    "recompute": "recompute",
    "attention": "attention graph",
    "replay": "replay",
}
DESCRIPTIONS: dict[str, str] = {
    "cached": "the encoder once per request (it also computes every layer's cross-attention K/V), "
    "then one decoder-step call per output token on the newest token only, reading and extending "
    "the self-attention cache: `translate_ids`, what the service does.",
    "recompute": "the encoder once, then per output token one teacher-forced decoder pass over the "
    "whole prefix (t tokens at step t), recomputing every self- and cross-attention K/V, with the "
    "output projection and log-softmax at the last position only: the loop of `export.generate`, "
    "run by onnxruntime. The honest no-cache baseline. The model directory has no graph for it, so "
    "the benchmark exports one from the same checkpoint, with the same exporter and opset.",
    "attention": "per output token one call of the committed `attention.onnx` (the Attend RPC's "
    "graph) over source and prefix: it re-runs the encoder, runs the decoder over the prefix and "
    "returns log-probabilities at every prefix position and every attention map: "
    '`translate_ids_without_cache(method="attention")`. More work per step than a plain recompute.',
    "replay": "the encoder once, then per output token the whole prefix fed again, token by token, "
    "through the decoder-step graph from an empty cache: t calls at step t, N(N+1)/2 in all: "
    '`translate_ids_without_cache(method="replay")`. The arithmetic of a recompute split into many '
    "small calls, so the per-call overhead weighs on it.",
}


def ban_token(log_probs: np.ndarray, token: int) -> np.ndarray:
    """`log_probs` (…, V) with `token` at -inf (in place): never chosen, the others unchanged."""
    log_probs[..., token] = -np.inf
    return log_probs


class EndlessGraphs(OnnxGraphs):
    """The model directory's graphs with the end token banned from every log-probability output."""

    def step(self, *args: np.ndarray, **kwargs: np.ndarray) -> StepOutput:
        out = super().step(*args, **kwargs)
        ban_token(out.log_probs, self.dims.eos_id)
        return out

    def attention(self, *args: np.ndarray, **kwargs: np.ndarray) -> Attention:
        out = super().attention(*args, **kwargs)
        ban_token(out.log_probs, self.dims.eos_id)
        return out


class _PrefixDecoderModule(nn.Module):
    """memory (B, S, D), src_mask (B, S), prefix (B, T), prefix mask (B, T) → log-probs (B, V) of
    the token after the prefix: `export.generate`'s uncached step, masks taken as inputs."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, memory: Tensor, src_mask: Tensor, tgt_ids: Tensor, tgt_mask: Tensor) -> Tensor:
        model = self.model
        tgt_mask_4d = causal_mask(tgt_ids.size(1), tgt_ids.device) & tgt_mask[:, None, None, :]
        hidden = model.decode(memory, src_mask[:, None, None, :], tgt_ids, tgt_mask_4d)  # (B, T, D)
        return F.log_softmax(model.logits(hidden[:, -1]), dim=-1)  # (B, V)


class PrefixDecoder:
    """The decoder as one teacher-forced onnxruntime graph over a whole prefix (the `recompute` step).

    Args:
        model_dir: a model directory with its checkpoint (`config.json`, `model.safetensors`).
        intra_op_threads: as for `OnnxGraphs`; None is onnxruntime's default.
    """

    def __init__(self, model_dir: Path | str, *, intra_op_threads: int | None = None) -> None:
        model = load_model(Path(model_dir))
        cfg = model.cfg
        spec = GraphSpec(
            "prefix_decoder.onnx",
            inputs=(
                TensorSpec("memory", "float32", ("batch", "src_len", cfg.d_model)),
                TensorSpec("src_mask", "bool", ("batch", "src_len")),
                TensorSpec("tgt_ids", "int64", ("batch", "tgt_len")),
                TensorSpec("tgt_mask", "bool", ("batch", "tgt_len")),
            ),
            outputs=(TensorSpec("log_probs", "float32", ("batch", cfg.vocab_size)),),
        )
        graph = trace_graph(_PrefixDecoderModule(model), spec, example_inputs(cfg, spec, TRACE_SIZES))
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        # Weights inline (a few MB): the session is built from memory, nothing is written.
        self.session = ort.InferenceSession(
            graph.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def __call__(
        self, memory: np.ndarray, src_mask: np.ndarray, tgt_ids: np.ndarray, tgt_mask: np.ndarray
    ) -> np.ndarray:
        """memory (B, S, D), src_mask (B, S), tgt_ids and tgt_mask (B, T) → log-probs (B, V)."""
        feeds = {"memory": memory, "src_mask": src_mask, "tgt_ids": tgt_ids, "tgt_mask": tgt_mask}
        return np.asarray(self.session.run(["log_probs"], feeds)[0])


class _RecomputeSteps:
    """Encoder once; every step runs the whole prefix through the decoder graph, end token banned."""

    def __init__(self, graphs: OnnxGraphs, decoder: PrefixDecoder, sources: Sequence[Sequence[int]]) -> None:
        self.decoder = decoder
        self.pad_id, self.eos_id = graphs.dims.pad_id, graphs.dims.eos_id
        src_ids, self.src_mask = pad_ids(sources, self.pad_id)  # (B, S), (B, S)
        self.memory = graphs.encode(src_ids, self.src_mask).memory  # (B, S, D)
        self.prefixes = Prefixes()

    def run(self, sentences: np.ndarray, parents: np.ndarray | None, tokens: np.ndarray) -> np.ndarray:
        prefixes = self.prefixes.grow(parents, tokens)  # (R, t)
        log_probs = self.decoder(
            self.memory[sentences], self.src_mask[sentences], prefixes, prefixes != self.pad_id
        )
        return ban_token(log_probs, self.eos_id)  # (R, V)


class ForcedLengthDecoders:
    """The four variants over one model directory, each decoding exactly N tokens per sentence.

    Args:
        model_dir: the model directory (graphs, manifest and checkpoint).
        intra_op_threads: onnxruntime threads per graph run, for every variant alike.
    """

    def __init__(self, model_dir: Path | str, *, intra_op_threads: int | None = None) -> None:
        self.graphs = EndlessGraphs(model_dir, intra_op_threads=intra_op_threads)
        self.prefix_decoder = PrefixDecoder(model_dir, intra_op_threads=intra_op_threads)

    def decode(
        self, variant: Variant, sources: Sequence[Sequence[int]], output_tokens: int
    ) -> list[tuple[int, ...]]:
        """Greedy outputs of `sources` (ids ending with the end token), `output_tokens` each.

        Raises:
            ValueError: an unknown variant; a source or length the model refuses.
            RuntimeError: an output of another length (the forcing failed).
        """
        graphs = self.graphs
        if variant == "cached":
            results = translate_ids(graphs, sources, max_output_tokens=output_tokens)
        elif variant == "recompute":
            states = start_states(graphs.dims, sources, 1, 1.0, output_tokens, 1)
            steps = _RecomputeSteps(graphs, self.prefix_decoder, sources)
            results = run_search(states, steps, graphs.dims.bos_id)
        elif variant in ("attention", "replay"):
            results = translate_ids_without_cache(
                graphs, sources, max_output_tokens=output_tokens, method=variant
            )
        else:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        outputs = [hyps[0].tokens for hyps in results]
        lengths = sorted({len(tokens) for tokens in outputs})
        if lengths != [output_tokens]:
            raise RuntimeError(f"{variant}: output lengths {lengths}, not exactly {output_tokens}")
        return outputs
