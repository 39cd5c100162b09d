"""The engine: onnxruntime sessions of one or more model directories, served by name.

`Engine(config)` loads every model directory of `EngineConfig` (each verified against its
manifest by `OnnxGraphs`), on the execution provider and in the variant the config asks for
(auto: CUDA when onnxruntime has it, else CPU; int8 on CPU, fp16 on CUDA, when that variant's
sub-directory is built and current, else fp32). Its typed step-level methods are what a
continuous-batching scheduler drives, one iteration at a time:

    cache = engine.new_cache(model)                      # a batch's KV cache, empty
    cache.append(engine.encode(model, new_sources))      # the new arrivals, encoded together
    log_probs = engine.step(model, tokens, cache)        # every running row; the cache grows in place
    cache.keep(parents)                                  # finished rows leave, beams branch

Rows may have different positions and past lengths: each row's slots are its own and masked
beyond its length. On CPU the cache (`service.engine.kv_cache.KVCache`) is pre-allocated host memory, a
step writes one slot per row, and the arrays pass straight into onnxruntime as views. On CUDA it
is `service.engine.device_kv_cache.DeviceKVCache`: the caches stay in device memory between steps (bound
with IOBinding), and its edits run there as small graphs; the engine checks it against the host
cache on a few steps when it loads a model, and keeps the host one if they disagree (`--kv-cache`).
No grpc here: the servicer maps this module's errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from service.config import EngineConfig, NamedModelDir
from service.engine.graphs import Attention, ModelDims, OnnxGraphs, pad_ids, step_difference
from service.engine.kv_cache import KV, BatchCache
from service.modeldir.manifest import (
    MANIFEST_FILE,
    Languages,
    Limits,
    ModelDirectoryError,
    derived_from_current,
)

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
        shown = self.name if len(self.name) <= 100 else self.name[:100] + "…"  # never echo a whole input
        return f"unknown model {shown!r}; this server has {', '.join(self.served)}"


class ProviderUnavailableError(RuntimeError):
    """The config forces an execution provider that this onnxruntime build does not have."""


class ModelSetError(ValueError):
    """The configured set of models cannot be served: none, two under one name, an unknown default."""


@dataclass(frozen=True)
class ModelInfo:
    """What is being served under one name (for GetModelInfo, metrics and limit checks)."""

    name: str  # what requests ask for: the manifest's name, or the one --model-dirs NAME=PATH gives
    version: str  # semantic version from the manifest
    variant: str  # fp32, int8, fp16 or optimized: which directory was loaded
    provider: str  # the onnxruntime execution provider running it, e.g. CPUExecutionProvider
    directory: Path  # the directory the graphs were loaded from (a variant's sub-directory, or the model's)
    limits: Limits  # max source / target tokens
    languages: Languages  # source and target language codes
    dims: ModelDims  # vocabulary, layers, heads, special ids
    kv_cache: str = "host"  # where its batches' KV caches live: "host" or "device" memory


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
        ModelDirectoryError: a directory (or forced variant) missing, stale or not what its manifest
            says, or a variant with the in-place decoder step on CUDA or with --kv-cache device.
        ProviderUnavailableError: cuda forced without it.
        ModelSetError: no directories, two served under one name, or an unknown default model.
    """

    def __init__(self, config: EngineConfig, metrics: Metrics | None = None) -> None:
        if not config.model_dirs:
            raise ModelSetError("no model directories to serve (--model-dirs / TRANSLATOR_MODEL_DIRS)")
        self.config = config
        self.metrics = metrics
        self.device = choose_device(config.provider, ort.get_available_providers())
        self._runners: dict[str, _Runner] = {}
        infos: dict[str, ModelInfo] = {}
        for source in config.model_dirs:
            named = source if isinstance(source, NamedModelDir) else None
            model_dir = Path(source.path if isinstance(source, NamedModelDir) else source)
            if named and named.name in infos:  # refused before loading the directory a second time
                raise _served_twice(named.name, model_dir, infos[named.name].directory)
            runner = self._load(model_dir, named.name if named else None)
            name = runner.info.name
            if name in infos:
                raise _served_twice(name, model_dir, infos[name].directory)
            self._runners[name], infos[name] = runner, runner.info
        self.models: Mapping[str, ModelInfo] = infos
        self.default_model = config.default_model or next(iter(infos))
        if self.default_model not in infos:
            raise ModelSetError(
                f"default model {config.default_model!r} (--default-model) is not among {', '.join(infos)}"
            )

    def _load(self, model_dir: Path, name: str | None) -> _Runner:
        variant, directory = choose_variant(model_dir, self.device, self.config.variant)
        providers = [CUDA, CPU] if self.device == "cuda" else [CPU]
        threads = self.config.intra_op_threads or None
        graphs = OnnxGraphs(directory, providers=providers, intra_op_threads=threads)
        if graphs.in_place and self.device == "cuda":
            raise ModelDirectoryError(
                f"{directory}: the {variant} variant's decoder step writes a host-memory cache in place "
                "(a CPU graph); on CUDA serve the fp16 or fp32 variant (--variant)"
            )
        manifest = graphs.manifest
        kv_cache = self._kv_cache_location(graphs)
        info = ModelInfo(
            name=name or manifest.name,
            version=manifest.version,
            variant=variant,
            provider=graphs.decoder_step.get_providers()[0],
            directory=directory,
            limits=manifest.limits,
            languages=manifest.languages,
            dims=graphs.dims,
            kv_cache=kv_cache,
        )
        log.info(
            "loaded %s %s (%s) from %s on %s, KV cache in %s memory",
            info.name,
            info.version,
            variant,
            directory,
            info.provider,
            kv_cache,
        )
        return _Runner(info, graphs, self.metrics)

    def _kv_cache_location(self, graphs: OnnxGraphs) -> str:
        """ "device" or "host": the config's choice (auto: device on CUDA), the device one checked
        against the host one on a few steps first — auto falls back to host memory if the two
        disagree or the device one fails; a forced device cache raises instead."""
        wanted = self.config.kv_cache
        if wanted == "host" or (wanted == "auto" and self.device != "cuda"):
            return "host"
        if graphs.in_place:  # on CPU only (see _load): its step writes the host cache itself
            raise ModelDirectoryError(
                f"{graphs.model_dir}: the in-place decoder step needs the host KV cache "
                "(--kv-cache host or auto)"
            )
        try:
            difference = device_cache_difference(graphs)
            problem = (
                None
                if difference <= _DEVICE_CACHE_TOLERANCE[graphs.float_dtype]
                else (f"its log-probs differ from the host cache's by up to {difference:.3g}")
            )
        except Exception as err:  # onnxruntime raises plain RuntimeErrors
            problem = f"it failed: {err!r}"
        if problem is None:
            return "device"
        where = graphs.model_dir
        if wanted == "device":
            raise RuntimeError(f"{where}: the device KV cache (--kv-cache device) is unusable: {problem}")
        log.error("%s: the device KV cache is unusable, so it stays in host memory: %s", where, problem)
        return "host"

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

    def encode(self, model: str | None, sources: Sequence[Sequence[int]]) -> KV:
        """Cross-attention K/V of new sentences, encoded together.

        Args:
            sources: token ids per sentence (each ending with the end token), unpadded.
        Returns:
            K/V (L, B, H, S, Dh) with mask (B, S): True at real source tokens.
        """
        return self._runner(model).encode(sources)

    def new_cache(self, model: str | None) -> BatchCache:
        """An empty KV cache for a batch of the model's rows, where `ModelInfo.kv_cache` says."""
        runner = self._runner(model)
        if runner.info.kv_cache == "device":
            return runner.graphs.new_device_cache()
        return runner.graphs.new_cache()

    def step(self, model: str | None, tokens: np.ndarray, cache: BatchCache) -> np.ndarray:
        """One decoder step for every row of `cache`, which gains each row's new slot.

        Args:
            tokens: (R,) each row's newest token, in the cache's row order.
        Returns:
            log_probs (R, V) float32, same order.
        """
        return self._runner(model).step(tokens, cache)

    def attention(
        self, model: str | None, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
    ) -> Attention:
        """Teacher-forced pass for Attend: sources and targets (start token + target ids), unpadded."""
        return self._runner(model).attention(sources, targets)

    def warm_up(self, steps: int = 3) -> None:
        """One short encode and a few decoder steps per model, so that the first request is not slow."""
        for name, info in self.models.items():
            dims = info.dims
            cache = self.new_cache(name)
            cache.append(self.encode(name, [[dims.bos_id, dims.eos_id]]))
            tokens = np.array([dims.bos_id], dtype=np.int64)
            for _ in range(steps):
                tokens = np.argmax(self.step(name, tokens, cache), axis=-1).astype(np.int64)
            self.attention(name, [[dims.bos_id, dims.eos_id]], [[dims.bos_id]])


def _served_twice(name: str, model_dir: Path, first: Path) -> ModelSetError:
    return ModelSetError(
        f"{model_dir}: model name {name!r} is already served from {first}; "
        "serve it under another name with --model-dirs NAME=PATH"
    )


# --- the device KV cache's check --------------------------------------------------------------------

# Largest |Δ log p| allowed between the two caches: the same graphs on the same device, only the
# slot layout differs (so sums run in another order); fp16 rounds at about 1e-3 relative.
_DEVICE_CACHE_TOLERANCE: dict[type, float] = {np.float32: 1e-3, np.float16: 5e-2}


def device_cache_difference(graphs: OnnxGraphs, steps: int = 8) -> float:
    """The largest |Δ log p| between the host and the device cache over a few steps with rows
    joining, branching and leaving (`service.engine.graphs.step_difference`)."""
    return step_difference((graphs, graphs.new_cache()), (graphs, graphs.new_device_cache()), steps)


# --- running the graphs -----------------------------------------------------------------------------


class _Runner:
    """One model's graphs: numpy in, numpy out, each run timed."""

    def __init__(self, info: ModelInfo, graphs: OnnxGraphs, metrics: Metrics | None) -> None:
        self.info, self.graphs, self.metrics = info, graphs, metrics

    @contextmanager
    def _timed(self, graph: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.metrics is not None:
            self.metrics.observe_graph_run(graph, time.perf_counter() - start)

    def encode(self, sources: Sequence[Sequence[int]]) -> KV:
        src_ids, src_mask = pad_ids(sources, self.info.dims.pad_id)
        with self._timed("encoder"):
            out = self.graphs.encode(src_ids, src_mask)
        return KV(out.cross_k, out.cross_v, src_mask)

    def step(self, tokens: np.ndarray, cache: BatchCache) -> np.ndarray:
        with self._timed("decoder_step"):
            return self.graphs.step_cache(tokens, cache)

    def attention(self, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> Attention:
        pad = self.info.dims.pad_id
        src_ids, src_mask = pad_ids(sources, pad)
        tgt_ids, tgt_mask = pad_ids(targets, pad)
        with self._timed("attention"):
            return self.graphs.attention(src_ids, src_mask, tgt_ids, tgt_mask)
