"""The model directory's ONNX graphs behind three numpy calls: encode, step, attention.

A thin onnxruntime wrapper: one `InferenceSession` per graph, inputs and outputs named as in
`docs/model-directory.md`. Loading verifies the directory against its `manifest.json` (checksums)
and each session against the manifest's signature of its graph. Each call feeds only the inputs
its session lists. `step_cache` runs a decoder step on the rows of a `service.engine.kv_cache.KVCache`,
which is how every decoder here (engine, reference decoder, benchmarks) steps.

A decoder step comes in one of two contracts (docs/model-directory.md): the traced one returns the
new token's keys/values for the caller to write into the cache; the in-place one (the int8 and
optimized variants' fused step) writes them into the cache buffers itself, bound with IOBinding at
their addresses (`InPlaceBinding`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from service.engine.device_kv_cache import DeviceKVCache, KVEditGraphs
from service.engine.kv_cache import KV, BatchCache, KVCache, StepInputs
from service.modeldir.manifest import Manifest, check_graph, load_manifest

_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class ModelDims:
    """What decoding needs to know about the model behind the graphs."""

    vocab_size: int  # V, the target vocabulary
    decoder_layers: int  # L of the caches
    heads: int  # H
    head_dim: int  # Dh = d_model / H
    max_positions: int  # longest sequence on either side, specials included
    pad_id: int
    bos_id: int  # the decoder's start token
    eos_id: int
    never: tuple[int, ...] | None = None  # the manifest's never_ids; None: pad and the start token
    forced_eos_at_limit: bool = False  # the manifest's decoding record says so

    @property
    def never_ids(self) -> tuple[int, ...]:
        """Tokens decoding never chooses."""
        return (self.pad_id, self.bos_id) if self.never is None else self.never

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ModelDims:
        shape = manifest.shape
        return cls(
            vocab_size=shape.vocab_size,
            decoder_layers=shape.decoder_layers,
            heads=shape.heads,
            head_dim=shape.head_dim,
            max_positions=shape.max_positions,
            pad_id=manifest.special_ids.pad,
            bos_id=manifest.special_ids.bos,
            eos_id=manifest.special_ids.eos,
            never=manifest.never_ids,
            forced_eos_at_limit=manifest.decoding is not None and manifest.decoding.forced_eos_at_limit,
        )


class Encoded(NamedTuple):
    memory: np.ndarray  # (B, S, D)
    cross_k: np.ndarray  # (L, B, H, S, Dh)
    cross_v: np.ndarray  # (L, B, H, S, Dh)


class StepOutput(NamedTuple):
    log_probs: np.ndarray  # (B, V) float32
    new_k: np.ndarray  # (L, B, H, Dh): the new token's self-attention keys, for the caller's cache
    new_v: np.ndarray  # (L, B, H, Dh)


class Attention(NamedTuple):
    log_probs: np.ndarray  # (B, T, V)
    encoder_attention: np.ndarray  # (L_enc, B, H, S, S)
    decoder_attention: np.ndarray  # (L, B, H, T, T)
    cross_attention: np.ndarray  # (L, B, H, T, S)


class OnnxGraphs:
    """The encoder, decoder-step and attention graphs of one model directory.

    Raises ModelDirectoryError (service.modeldir.manifest) when the directory or a graph is not what its
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
        # need the cores those threads would burn (what spinning cost: docs/measured-choices.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chosen = providers or ["CPUExecutionProvider"]
        self.providers = chosen
        self.encoder = self._session("encoder", options, chosen)
        self.decoder_step = self._session("decoder_step", options, chosen)
        self.attention_graph = self._session("attention", options, chosen)
        past_type = _input_types(self.decoder_step)["past_k_0"]
        self.float_dtype: type = _FLOAT_TYPES[past_type]  # of the caches: float32, or float16 (fp16)
        # The in-place contract (export.onnx.contract.in_place_step_spec): the graph writes the cache.
        self.in_place = "total_length" in _input_types(self.decoder_step)
        self._bindings: weakref.WeakKeyDictionary[KVCache, InPlaceBinding] = weakref.WeakKeyDictionary()

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

    def new_cache(self) -> KVCache:
        """An empty cache for this model's decoder (rows join with `KVCache.append`)."""
        d = self.dims
        return KVCache(d.decoder_layers, d.heads, d.head_dim, self.float_dtype)

    def new_device_cache(self) -> DeviceKVCache:
        """An empty cache in the decoder-step session's device memory (service/engine/device_kv_cache.py)."""
        d = self.dims
        return DeviceKVCache(self.decoder_step, self._kv_edits, d.decoder_layers, d.heads, d.head_dim)

    @functools.cached_property
    def _kv_edits(self) -> KVEditGraphs:
        """The device cache's edit graphs, on the decoder step's device (loaded at the first use)."""
        device = "cuda" if self.decoder_step.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        return KVEditGraphs(self.float_dtype, self.providers, device)

    def step(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        past_k: Any,
        past_v: Any,
        self_mask: np.ndarray,
        cross_k: Any,
        cross_v: Any,
        src_mask: np.ndarray,
    ) -> StepOutput:
        """One decoder step for every row.

        Args:
            tokens: (B, 1) the newest token of each row; positions: (B,) its position in its row.
            past_k, past_v: per layer l, past_k[l] is (B, H, T, Dh), T may be 0 (a stacked
                (L, B, H, T, Dh) array, or a view of a larger buffer whose [l] is contiguous).
            self_mask: (B, T) the real past slots (the new token is always attended).
            cross_k, cross_v: per layer (B, H, S, Dh), as past_k; src_mask: (B, S).
        Returns:
            log_probs (B, V) and the new token's keys/values new_k, new_v (L, B, H, Dh).
        """
        feeds = {
            "tokens": _ids(tokens),
            "positions": _ids(positions),
            "self_mask": _mask(self_mask),
            "src_mask": _mask(src_mask),
        }
        for layer in range(self.dims.decoder_layers):
            feeds[f"past_k_{layer}"] = np.ascontiguousarray(past_k[layer])
            feeds[f"past_v_{layer}"] = np.ascontiguousarray(past_v[layer])
            feeds[f"cross_k_{layer}"] = np.ascontiguousarray(cross_k[layer])
            feeds[f"cross_v_{layer}"] = np.ascontiguousarray(cross_v[layer])
        return StepOutput(*_run(self.decoder_step, feeds, StepOutput._fields))

    def step_cache(self, tokens: np.ndarray, cache: BatchCache) -> np.ndarray:
        """One decoder step for the rows of `cache`, which gains their new slot.

        Args:
            tokens: (R,) each row's newest token, in the cache's (logical) row order.
        Returns:
            log_probs (R, V) float32, same order.
        """
        if isinstance(cache, DeviceKVCache):
            return cache.step(tokens)
        assert isinstance(cache, KVCache), type(cache)
        if self.in_place:
            inputs = cache.step_inputs()
            binding = self._bindings.get(cache)
            if binding is None or not binding.fits(inputs):
                binding = InPlaceBinding(self.decoder_step, inputs, self.dims.vocab_size)
                self._bindings[cache] = binding
            log_probs = binding.run(cache.to_physical(tokens), inputs.positions)
            cache.wrote_slots()
            return cache.to_logical(log_probs)  # a copy: the binding's buffer is reused
        out = self.run_step(cache.to_physical(tokens), cache.step_inputs())
        cache.record(out.new_k, out.new_v)
        return cache.to_logical(out.log_probs)

    def run_step(self, tokens: np.ndarray, inputs: StepInputs) -> StepOutput:
        """`step` on a cache's `StepInputs`; tokens (R,) in the same (physical) row order. The cache
        is not written: `step_cache` records the new slot, a benchmark may run the same step again.
        (An in-place step writes each row's next slot, which no real slot is, and returns no new
        K/V: `new_k`/`new_v` are read back from those slots.)"""
        if self.in_place:
            binding = InPlaceBinding(self.decoder_step, inputs, self.dims.vocab_size)
            log_probs = binding.run(tokens, inputs.positions).copy()
            rows = np.arange(len(inputs.positions))
            new_k = inputs.past_k[:, rows, :, inputs.positions].transpose(1, 0, 2, 3)
            new_v = inputs.past_v[:, rows, :, inputs.positions].transpose(1, 0, 2, 3)
            return StepOutput(log_probs, new_k, new_v)
        return self.step(
            tokens[:, None],
            inputs.positions,
            inputs.past_k,
            inputs.past_v,
            inputs.self_mask,
            inputs.cross_k,
            inputs.cross_v,
            inputs.src_mask,
        )

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


class InPlaceBinding:
    """The in-place decoder step bound to one cache's buffers at their addresses: each layer's
    `past_{k,v}_{l}` and `present_{k,v}_{l}` are the same memory (GroupQueryAttention then writes
    the new slot in place), the cross K/V and source mask are views, and tokens, positions and the
    log-probs live in arrays of this binding, so that a step only copies its tokens and positions
    in. Valid while the cache keeps its rows and buffers (`fits`)."""

    def __init__(self, session: ort.InferenceSession, inputs: StepInputs, vocab: int) -> None:
        rows = len(inputs.positions)
        self.key = (inputs.generation, rows)
        self.tokens = np.zeros((rows, 1), np.int64)
        self.positions = np.zeros(rows, np.int32)
        self.total = np.zeros((), np.int32)
        self.log_probs = np.zeros((rows, vocab), np.float32)
        self.session = session
        binding = self.binding = session.io_binding()
        # OrtValues over the arrays' own memory (CPU: no copy; each keeps its array alive). A cache
        # rebinds whenever its rows change, so this is on the step path: ~5 µs a tensor this way.
        self._values: list[ort.OrtValue] = []

        def bind(name: str, array: np.ndarray, output: str | None = None) -> None:
            assert array.flags.c_contiguous, name
            value = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(name, value)
            if output is not None:
                binding.bind_ortvalue_output(output, value)
            self._values.append(value)

        bind("tokens", self.tokens)
        bind("positions", self.positions)
        bind("total_length", self.total)
        bind("src_mask", inputs.src_mask)
        log_probs = ort.OrtValue.ortvalue_from_numpy(self.log_probs)
        binding.bind_ortvalue_output("log_probs", log_probs)
        self._values.append(log_probs)
        for layer in range(inputs.past_k.shape[0]):
            bind(f"past_k_{layer}", inputs.past_k[layer], f"present_k_{layer}")
            bind(f"past_v_{layer}", inputs.past_v[layer], f"present_v_{layer}")
            bind(f"cross_k_{layer}", inputs.cross_k[layer])
            bind(f"cross_v_{layer}", inputs.cross_v[layer])

    def fits(self, inputs: StepInputs) -> bool:
        return self.key == (inputs.generation, len(inputs.positions))

    def run(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """log_probs (R, V) in this binding's buffer (overwritten by the next run); the cache's
        next slots written."""
        self.tokens[:, 0] = tokens
        self.positions[:] = positions
        self.total[()] = int(positions.max(initial=0)) + 1
        self.session.run_with_iobinding(self.binding)
        return self.log_probs


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


def pad_ids(sources: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids (B, S) and their mask (B, S), True at each row's own tokens.

    The mask comes from the lengths, not from the ids: a target may start with the pad token
    (Marian's decoder starts from it).
    """
    width = max(len(s) for s in sources)
    ids = np.full((len(sources), width), pad_id, dtype=np.int64)
    lengths = np.array([len(s) for s in sources])
    for row, source in enumerate(sources):
        ids[row, : len(source)] = source
    return ids, np.arange(width) < lengths[:, None]


def encode_sources(graphs: OnnxGraphs, sources: Sequence[Sequence[int]]) -> KV:
    """Cross-attention K/V of the padded sources, one row per sentence, masked by src_mask."""
    src_ids, src_mask = pad_ids(sources, graphs.dims.pad_id)
    encoded = graphs.encode(src_ids, src_mask)
    return KV(encoded.cross_k, encoded.cross_v, src_mask)


def step_difference(
    reference: tuple[OnnxGraphs, BatchCache], other: tuple[OnnxGraphs, BatchCache], steps: int = 8
) -> float:
    """Decode a few steps through two (graphs, empty cache) pairs, with rows joining, branching
    and leaving, feeding both the reference's greedy tokens; the largest |Δ log p| between them.
    Checks a cache against another (host against device) or a step graph against another (the
    in-place fused step against the traced one), each pair encoding with its own encoder."""
    d = reference[0].dims
    words = [t for t in range(d.vocab_size) if t not in (d.pad_id, d.bos_id, d.eos_id)]
    sources = [[*words[i : i + n], d.eos_id] for i, n in ((0, 3), (7, 6), (20, 9))]
    pairs = (reference, other)
    for graphs, cache in pairs:
        cache.append(encode_sources(graphs, sources[:2]))
    tokens, worst = np.full(2, d.bos_id, dtype=np.int64), 0.0
    for step in range(steps):
        if step == 2:  # a longer source joins
            for graphs, cache in pairs:
                cache.append(encode_sources(graphs, sources[2:]))
            tokens = np.append(tokens, d.bos_id)
        if step == 5:  # the first row leaves, the last one branches
            for _, cache in pairs:
                cache.keep([1, 2, 2])
            tokens = tokens[[1, 2, 2]]
        expected, got = (graphs.step_cache(tokens, cache) for graphs, cache in pairs)
        worst = max(worst, float(np.abs(expected - got).max()))
        tokens = np.argmax(expected, axis=-1).astype(np.int64)
    return worst
