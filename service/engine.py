"""The engine: onnxruntime sessions of one or more model directories, served by name.

`Engine(config)` loads every model directory of `EngineConfig` (each verified against its
manifest by `OnnxGraphs`), on the execution provider and in the variant the config asks for
(auto: CUDA when onnxruntime has it, else CPU; int8 on CPU, fp16 on CUDA, when that variant's
sub-directory is built and current, else fp32). Its typed step-level methods are what a
continuous-batching scheduler drives, one iteration at a time:

    cross = engine.encode(model, new_sources)            # the new arrivals together
    cache = engine.empty_cache(model, rows)              # their (empty) self-attention cache
    log_probs, cache = engine.step(model, tokens, positions, cache, cross)   # every running row

Rows may have different positions and past lengths (masked padding), so the scheduler merges
newcomers with `service.decoding.concat_rows` and drops or reorders rows with `select_rows`.
On CPU the arrays are numpy and pass straight into onnxruntime. On CUDA (`_CudaRunner`) the caches
come back as `DeviceKV`: their K/V stay on the GPU between steps (IOBinding, OrtValues), and only
the log-probabilities come to the host. No grpc here: the servicer maps this module's errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from service.config import EngineConfig
from service.decoding import KV, Hypothesis, empty_kv, extend, step_mask
from service.graphs import Attention, ModelDims, OnnxGraphs
from service.manifest import MANIFEST_FILE, Languages, Limits, ModelDirectoryError, derived_from_current
from service.reference_decoder import pad_ids, translate_ids

if TYPE_CHECKING:  # only the type: service.metrics imports grpc, which the engine must not pull in
    from service.metrics import Metrics

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
_DEFAULT_VARIANT = {"cpu": "int8", "cuda": "fp16"}  # what `variant=auto` prefers on each device


class ModelNotFoundError(KeyError):
    """A request named a model this engine does not serve (the servicer answers NOT_FOUND)."""

    def __init__(self, name: str, served: Sequence[str]) -> None:
        super().__init__(name)
        self.name, self.served = name, tuple(served)

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; this server has {', '.join(self.served)}"


class ProviderUnavailableError(RuntimeError):
    """The config forces an execution provider that this onnxruntime build does not have."""


@dataclass(frozen=True)
class ModelInfo:
    """What is being served under one name (for GetModelInfo, metrics and limit checks)."""

    name: str  # from the manifest; what requests ask for
    version: str  # semantic version from the manifest
    variant: str  # fp32, int8, fp16 or optimized: which directory was loaded
    provider: str  # the onnxruntime execution provider running it, e.g. CPUExecutionProvider
    directory: Path  # the directory the graphs were loaded from (a variant's sub-directory, or the model's)
    limits: Limits  # max source / target tokens
    languages: Languages  # source and target language codes
    dims: ModelDims  # vocabulary, layers, heads, special ids


@dataclass(frozen=True)
class DeviceKV:
    """A `KV` whose keys and values live on the GPU (onnxruntime OrtValues); the mask stays on the host."""

    k: Any  # ort.OrtValue (L, B, H, T, Dh) on the device
    v: Any  # ort.OrtValue (L, B, H, T, Dh)
    mask: np.ndarray  # (B, T) bool

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def slots(self) -> int:
        return int(self.mask.shape[1])


Cache = KV | DeviceKV  # numpy on CPU; DeviceKV after a CUDA step or encode


# --- choosing the provider and the variant (pure) ---------------------------------------------------


def choose_device(requested: str, available: Sequence[str]) -> str:
    """ "cpu" or "cuda" for the configured provider, given onnxruntime's available providers.

    Raises:
        ProviderUnavailableError: cuda is forced and onnxruntime has no CUDAExecutionProvider.
    """
    if requested == "cuda" and CUDA not in available:
        raise ProviderUnavailableError(
            f"provider 'cuda' was asked for (--provider / TRANSLATOR_PROVIDER) but this onnxruntime "
            f"has only {', '.join(available)}; install onnxruntime-gpu or use --provider auto or cpu"
        )
    if requested == "auto":
        return "cuda" if CUDA in available else "cpu"
    return requested


def choose_variant(model_dir: Path, device: str, requested: str) -> tuple[str, Path]:
    """Which variant of `model_dir` to load, and from which directory.

    auto: int8 on CPU, fp16 on CUDA, when its sub-directory has a manifest derived from the current
    fp32 manifest; otherwise fp32 (the directory itself). A forced variant must exist.

    Raises:
        ModelDirectoryError: a forced variant whose sub-directory or manifest is missing, naming the path.
    """
    if requested == "fp32":
        return "fp32", model_dir
    wanted = _DEFAULT_VARIANT[device] if requested == "auto" else requested
    sub = model_dir / wanted
    if not (sub / MANIFEST_FILE).is_file():
        if requested == "auto":
            return "fp32", model_dir
        raise ModelDirectoryError(
            f"{sub / MANIFEST_FILE}: variant {wanted!r} was asked for but is not built (run `make setup`)"
        )
    if not derived_from_current(sub, model_dir):
        if requested == "auto":
            log.warning("%s: stale (not derived from the current fp32 graphs), loading fp32", sub)
            return "fp32", model_dir
        raise ModelDirectoryError(f"{sub}: variant {wanted!r} is stale; rebuild it (make setup)")
    return wanted, sub


# --- the engine -------------------------------------------------------------------------------------


class Engine:
    """Every model of the config, loaded and served by name.

    Args:
        config: model directories, provider, variant, threads.
        metrics: when given, every graph run is observed (`observe_graph_run`).
    Raises:
        ModelDirectoryError: a directory (or forced variant) missing, stale or not what its manifest says.
        ProviderUnavailableError: cuda forced without it.
        ValueError: no directories, two with the same model name, or an unknown default model.
    """

    def __init__(self, config: EngineConfig, metrics: Metrics | None = None) -> None:
        if not config.model_dirs:
            raise ValueError("no model directories to serve (--model-dirs / TRANSLATOR_MODEL_DIRS)")
        self.config = config
        self.metrics = metrics
        self.device = choose_device(config.provider, ort.get_available_providers())
        self._runners: dict[str, _Runner] = {}
        infos: dict[str, ModelInfo] = {}
        for model_dir in config.model_dirs:
            runner = self._load(Path(model_dir))
            name = runner.info.name
            if name in infos:
                raise ValueError(
                    f"{model_dir}: model name {name!r} is already served from {infos[name].directory}"
                )
            self._runners[name], infos[name] = runner, runner.info
        self.models: Mapping[str, ModelInfo] = infos
        self.default_model = config.default_model or next(iter(infos))
        if self.default_model not in infos:
            raise ValueError(
                f"default model {config.default_model!r} (--default-model) is not among {', '.join(infos)}"
            )

    def _load(self, model_dir: Path) -> _Runner:
        variant, directory = choose_variant(model_dir, self.device, self.config.variant)
        providers = [CUDA, CPU] if self.device == "cuda" else [CPU]
        threads = self.config.intra_op_threads or None
        graphs = OnnxGraphs(directory, providers=providers, intra_op_threads=threads)
        manifest = graphs.manifest
        info = ModelInfo(
            name=manifest.name,
            version=manifest.version,
            variant=variant,
            provider=graphs.decoder_step.get_providers()[0],
            directory=directory,
            limits=manifest.limits,
            languages=manifest.languages,
            dims=graphs.dims,
        )
        log.info(
            "loaded %s %s (%s) from %s on %s", info.name, info.version, variant, directory, info.provider
        )
        runner_class = _CudaRunner if info.provider == CUDA else _Runner
        return runner_class(info, graphs, self.metrics)

    def model(self, name: str | None = None) -> ModelInfo:
        """The model served as `name` (None: the default one); ModelNotFoundError if none."""
        return self._runner(name).info

    def graphs(self, name: str | None = None) -> OnnxGraphs:
        """The onnxruntime graphs of a model (for the reference decoder and tests)."""
        return self._runner(name).graphs

    def _runner(self, name: str | None) -> _Runner:
        key = self.default_model if name is None else name
        try:
            return self._runners[key]
        except KeyError:
            raise ModelNotFoundError(key, list(self._runners)) from None

    # The step-level calls of a scheduler iteration.

    def encode(self, model: str | None, sources: Sequence[Sequence[int]]) -> Cache:
        """Cross-attention K/V of new sentences, encoded together.

        Args:
            sources: token ids per sentence (each ending with the end token), unpadded.
        Returns:
            K/V (L, B, H, S, Dh) with mask (B, S): True at real source tokens.
        """
        return self._runner(model).encode(sources)

    def empty_cache(self, model: str | None, rows: int) -> KV:
        """A self-attention cache with no slots for `rows` new rows (their first step)."""
        dims = self._runner(model).info.dims
        return empty_kv(dims.decoder_layers, rows, dims.heads, dims.head_dim, self.graphs(model).float_dtype)

    def step(
        self, model: str | None, tokens: np.ndarray, positions: np.ndarray, cache: Cache, cross: Cache
    ) -> tuple[np.ndarray, Cache]:
        """One decoder step for every running row.

        Args:
            tokens: (R,) each row's newest token; positions: (R,) its position in its own row.
            cache: the rows' self-attention cache (R rows, masked padding allowed).
            cross: the rows' cross K/V from `encode` (R rows, in the same order).
        Returns:
            log_probs (R, V) float32 on the host, and the cache grown by one (real) slot.
        """
        return self._runner(model).step(tokens, positions, cache, cross)

    def attention(
        self, model: str | None, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
    ) -> Attention:
        """Teacher-forced pass for Attend: sources and targets (start token + target ids), unpadded."""
        return self._runner(model).attention(sources, targets)

    def to_host(self, cache: Cache) -> KV:
        """A cache as numpy, for row edits (concat_rows, select_rows, trim_slots); a no-op on CPU."""
        if isinstance(cache, KV):
            return cache
        return KV(cache.k.numpy(), cache.v.numpy(), cache.mask)

    def translate_ids(
        self, model: str | None, sources: Sequence[Sequence[int]], **options: Any
    ) -> list[list[Hypothesis]]:
        """Convenience: `service.reference_decoder.translate_ids` on a model (not timed into metrics)."""
        return translate_ids(self.graphs(model), sources, **options)

    def warm_up(self, steps: int = 3) -> None:
        """One short encode and a few decoder steps per model, so that the first request is not slow."""
        for name, info in self.models.items():
            dims = info.dims
            cross = self.encode(name, [[dims.bos_id, dims.eos_id]])
            cache: Cache = self.empty_cache(name, 1)
            tokens = np.array([dims.bos_id], dtype=np.int64)
            for position in range(steps):
                log_probs, cache = self.step(name, tokens, np.array([position], dtype=np.int64), cache, cross)
                tokens = np.argmax(log_probs, axis=-1).astype(np.int64)
            self.attention(name, [[dims.bos_id, dims.eos_id]], [[dims.bos_id]])


# --- running the graphs -----------------------------------------------------------------------------


class _Runner:
    """One model's graphs on CPU: numpy in, numpy out, each run timed."""

    def __init__(self, info: ModelInfo, graphs: OnnxGraphs, metrics: Metrics | None) -> None:
        self.info, self.graphs, self.metrics = info, graphs, metrics

    @contextmanager
    def _timed(self, graph: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.metrics is not None:
            self.metrics.observe_graph_run(graph, time.perf_counter() - start)

    def encode(self, sources: Sequence[Sequence[int]]) -> Cache:
        src_ids, src_mask = pad_ids(sources, self.info.dims.pad_id)
        with self._timed("encoder"):
            out = self.graphs.encode(src_ids, src_mask)
        return KV(out.cross_k, out.cross_v, src_mask)

    def step(
        self, tokens: np.ndarray, positions: np.ndarray, cache: Cache, cross: Cache
    ) -> tuple[np.ndarray, Cache]:
        assert isinstance(cache, KV) and isinstance(cross, KV), "device caches on a CPU model"
        with self._timed("decoder_step"):
            out = self.graphs.step(
                tokens[:, None], positions, cache.k, cache.v, step_mask(cache), cross.k, cross.v, cross.mask
            )
        return out.log_probs, extend(cache, out.present_k, out.present_v)

    def attention(self, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> Attention:
        pad = self.info.dims.pad_id
        src_ids, src_mask = pad_ids(sources, pad)
        tgt_ids, tgt_mask = pad_ids(targets, pad)
        with self._timed("attention"):
            return self.graphs.attention(src_ids, src_mask, tgt_ids, tgt_mask)


class _CudaRunner(_Runner):
    """The CUDA path: K/V bound as OrtValues on the GPU so that caches stay there between steps.

    UNTESTED: written against onnxruntime's IOBinding API without a GPU to run it on (the test
    suite runs on CPU). Only the step and the encoder are bound; attention (off the fast path) runs
    as on CPU. Row edits still go through the host (`Engine.to_host`); a small gather graph on the
    device is the next step when batches change often.
    """

    def _device(self, x: Any) -> Any:
        """An OrtValue on the GPU: uploaded once if it is numpy, as it is if already there."""
        if isinstance(x, np.ndarray):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", 0)
        return x

    def encode(self, sources: Sequence[Sequence[int]]) -> Cache:
        src_ids, src_mask = pad_ids(sources, self.info.dims.pad_id)
        binding = self.graphs.encoder.io_binding()
        binding.bind_cpu_input("src_ids", src_ids)
        binding.bind_cpu_input("src_mask", src_mask)
        for name in ("memory", "cross_k", "cross_v"):
            binding.bind_output(name, "cuda")
        with self._timed("encoder"):
            self.graphs.encoder.run_with_iobinding(binding)
        _memory, cross_k, cross_v = binding.get_outputs()
        return DeviceKV(cross_k, cross_v, src_mask)

    def step(
        self, tokens: np.ndarray, positions: np.ndarray, cache: Cache, cross: Cache
    ) -> tuple[np.ndarray, Cache]:
        session = self.graphs.decoder_step
        binding = session.io_binding()
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens[:, None], dtype=np.int64))
        binding.bind_cpu_input("positions", np.ascontiguousarray(positions, dtype=np.int64))
        # The cache's slots, then the new token (always real): `step_mask` for either kind of cache.
        self_mask = np.concatenate([cache.mask, np.ones((cache.rows, 1), dtype=bool)], axis=1)
        binding.bind_cpu_input("self_mask", self_mask)
        binding.bind_cpu_input("src_mask", np.ascontiguousarray(cross.mask, dtype=bool))
        for name, value in (
            ("past_k", cache.k),
            ("past_v", cache.v),
            ("cross_k", cross.k),
            ("cross_v", cross.v),
        ):
            binding.bind_ortvalue_input(name, self._device(value))
        binding.bind_output("log_probs", "cpu")
        binding.bind_output("present_k", "cuda")
        binding.bind_output("present_v", "cuda")
        with self._timed("decoder_step"):
            session.run_with_iobinding(binding)
        log_probs, present_k, present_v = binding.get_outputs()
        return log_probs.numpy(), DeviceKV(present_k, present_v, self_mask)
