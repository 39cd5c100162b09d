"""The model directory's ONNX graphs behind three numpy calls: encode, step, attention.

A thin onnxruntime wrapper: one `InferenceSession` per graph, inputs and outputs named as in
`docs/model-directory.md`. Loading verifies the directory against its `manifest.json` (checksums)
and each session against the manifest's signature of its graph. Each call feeds only the inputs
its session lists.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from service.manifest import Manifest, check_graph, load_manifest

_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class ModelDims:
    """What decoding needs to know about the model behind the graphs."""

    vocab_size: int  # V
    decoder_layers: int  # L of the caches
    heads: int  # H
    head_dim: int  # Dh = d_model / H
    max_positions: int  # longest sequence on either side, specials included
    pad_id: int
    bos_id: int  # the decoder's start token
    eos_id: int

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ModelDims:
        arch = manifest.architecture  # the TransformerConfig fields
        return cls(
            vocab_size=int(arch["vocab_size"]),
            decoder_layers=int(arch["n_decoder_layers"]),
            heads=int(arch["n_heads"]),
            head_dim=int(arch["d_model"]) // int(arch["n_heads"]),
            max_positions=int(arch["max_positions"]),
            pad_id=manifest.special_ids.pad,
            bos_id=manifest.special_ids.bos,
            eos_id=manifest.special_ids.eos,
        )


class Encoded(NamedTuple):
    memory: np.ndarray  # (B, S, D)
    cross_k: np.ndarray  # (L, B, H, S, Dh)
    cross_v: np.ndarray  # (L, B, H, S, Dh)


class StepOutput(NamedTuple):
    log_probs: np.ndarray  # (B, V) float32
    present_k: np.ndarray  # (L, B, H, P + 1, Dh): the cache with the new token's K appended last
    present_v: np.ndarray  # (L, B, H, P + 1, Dh)


class Attention(NamedTuple):
    log_probs: np.ndarray  # (B, T, V)
    encoder_attention: np.ndarray  # (L_enc, B, H, S, S)
    decoder_attention: np.ndarray  # (L, B, H, T, T)
    cross_attention: np.ndarray  # (L, B, H, T, S)


class OnnxGraphs:
    """The encoder, decoder-step and attention graphs of one model directory.

    Raises ModelDirectoryError (service.manifest) when the directory or a graph is not what its
    manifest says.

    Args:
        model_dir: a model directory (`docs/model-directory.md`) with its manifest.
        providers: onnxruntime execution providers, best first; CPU when None.
        intra_op_threads: threads per graph run; onnxruntime's default when None.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        # Verifies every file's checksum: graphs, weights and tokenizer are the ones exported together.
        self.manifest = load_manifest(self.model_dir)
        self.dims = ModelDims.from_manifest(self.manifest)
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        # onnxruntime's pool threads spin between and after runs by default. A decoder step is a few
        # milliseconds, and between two steps the decode loop's own Python and the gRPC event loop
        # need the cores those threads would burn: with spinning the service reached about 0.7x the
        # throughput it has without (2 cores, `make bench`), and the engine alone was no faster.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chosen = providers or ["CPUExecutionProvider"]
        self.encoder = self._session("encoder", options, chosen)
        self.decoder_step = self._session("decoder_step", options, chosen)
        self.attention_graph = self._session("attention", options, chosen)
        past_type = _input_types(self.decoder_step)["past_k"]
        self.float_dtype: type = _FLOAT_TYPES[past_type]  # of the caches: float32, or float16 (fp16)

    def _session(self, graph: str, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
        """A session for one graph of the manifest, refused unless its signature is the manifest's."""
        spec = self.manifest.graphs[graph]
        path = self.model_dir / spec.file
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        check_graph(spec, session)
        return session

    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> Encoded:
        """src_ids, src_mask: (B, S) → memory (B, S, D), cross_k and cross_v (L, B, H, S, Dh)."""
        feeds = {"src_ids": _ids(src_ids), "src_mask": _mask(src_mask)}
        return Encoded(*_run(self.encoder, feeds, Encoded._fields))

    def step(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        past_k: np.ndarray,
        past_v: np.ndarray,
        self_mask: np.ndarray,
        cross_k: np.ndarray,
        cross_v: np.ndarray,
        src_mask: np.ndarray,
    ) -> StepOutput:
        """One decoder step for every row.

        Args:
            tokens: (B, 1) the newest token of each row; positions: (B,) its position in its row.
            past_k, past_v: (L, B, H, P, Dh), P may be 0; self_mask: (B, P + 1) real slots, new last.
            cross_k, cross_v: (L, B, H, S, Dh) from `encode`; src_mask: (B, S).
        Returns:
            log_probs (B, V) and present_k/v (L, B, H, P + 1, Dh).
        """
        feeds = {
            "tokens": _ids(tokens),
            "positions": _ids(positions),
            "past_k": past_k,
            "past_v": past_v,
            "self_mask": _mask(self_mask),
            "cross_k": cross_k,
            "cross_v": cross_v,
            "src_mask": _mask(src_mask),
        }
        return StepOutput(*_run(self.decoder_step, feeds, StepOutput._fields))

    def attention(
        self, src_ids: np.ndarray, src_mask: np.ndarray, tgt_ids: np.ndarray, tgt_mask: np.ndarray
    ) -> Attention:
        """Teacher-forced pass: (B, S) source, (B, T) start token + target → log-probs and attentions."""
        feeds = {
            "src_ids": _ids(src_ids),
            "src_mask": _mask(src_mask),
            "tgt_ids": _ids(tgt_ids),
            "tgt_mask": _mask(tgt_mask),
        }
        return Attention(*_run(self.attention_graph, feeds, Attention._fields))


def _ids(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.int64)


def _mask(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=bool)


def _input_types(session: ort.InferenceSession) -> dict[str, str]:
    return {i.name: i.type for i in session.get_inputs()}


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[Any]:
    """Run `session` on the feeds it lists; a listed input missing from `feeds` is a bug here."""
    wanted = _input_names(session)
    missing = [name for name in wanted if name not in feeds]
    assert not missing, f"no value for graph inputs {missing}"
    return list(session.run(list(outputs), {name: feeds[name] for name in wanted}))


_INPUT_NAMES: weakref.WeakKeyDictionary[ort.InferenceSession, list[str]] = weakref.WeakKeyDictionary()


def _input_names(session: ort.InferenceSession) -> list[str]:
    """The graph's input names, read once per session (get_inputs() builds new objects each call)."""
    names = _INPUT_NAMES.get(session)
    if names is None:
        names = _INPUT_NAMES[session] = [i.name for i in session.get_inputs()]
    return names
