"""service.engine.engine on the committed model (models/en-fr-small), CPU: loading, variant and provider
choice, several models by name, and step-level results identical to OnnxGraphs called directly."""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.config import EngineConfig, NamedModelDir
from service.engine.engine import (
    CPU,
    CUDA,
    Engine,
    ModelNotFoundError,
    ModelSetError,
    ProviderUnavailableError,
    choose_device,
    choose_variant,
)
from service.engine.graphs import OnnxGraphs, pad_ids
from service.engine.reference_decoder import translate_ids
from service.metrics import Metrics
from service.modeldir.manifest import MANIFEST_FILE, ModelDirectoryError, load_manifest, write_manifest

MODEL_DIR = Path("models/en-fr-small")
SOURCES = [[5, 17, 42, 9, 2], [33, 2], [7, 8, 9, 10, 11, 12, 2]]  # unpadded, each ending with </s>
needs_int8 = pytest.mark.skipif(
    not (MODEL_DIR / "int8" / MANIFEST_FILE).is_file(),
    reason="models/en-fr-small/int8 is not built (`make setup` builds it)",
)


def _engine(**overrides: Any) -> Engine:
    config = dataclasses.replace(EngineConfig(model_dirs=(MODEL_DIR,), intra_op_threads=1), **overrides)
    return Engine(config)


@pytest.fixture(scope="module")
def fp32_engine() -> Engine:
    return _engine(variant="fp32")


@pytest.fixture(scope="module")
def renamed_copy(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`renamed_copy(name)` → a copy of the fp32 directory whose manifest serves it as `name`
    (the manifest checksums the files it lists, not itself, so renaming keeps it verified)."""

    def make(name: str) -> Path:
        out = tmp_path_factory.mktemp(name)
        manifest = load_manifest(MODEL_DIR)
        for file in manifest.files:
            shutil.copy2(MODEL_DIR / file, out / file)
        write_manifest(out, dataclasses.replace(manifest, name=name))
        return out

    return make


def test_loads_the_model_with_its_manifest_facts(fp32_engine: Engine) -> None:
    info = fp32_engine.model("en-fr-small")
    manifest = load_manifest(MODEL_DIR)
    assert list(fp32_engine.models) == ["en-fr-small"] and fp32_engine.default_model == "en-fr-small"
    assert (info.name, info.version, info.variant, info.provider) == (
        "en-fr-small",
        manifest.version,
        "fp32",
        CPU,
    )
    assert (info.limits, info.languages, info.directory) == (manifest.limits, manifest.languages, MODEL_DIR)
    assert fp32_engine.model(None) is info


def test_choose_device() -> None:
    assert choose_device("auto", [CPU]) == "cpu"
    assert choose_device("auto", [CUDA, CPU]) == "cuda"
    assert choose_device("cpu", [CUDA, CPU]) == "cpu"
    with pytest.raises(ProviderUnavailableError, match=r"provider 'cuda'.*CPUExecutionProvider"):
        choose_device("cuda", [CPU])


def test_forcing_cuda_without_it_is_a_clear_error() -> None:
    with pytest.raises(ProviderUnavailableError, match="onnxruntime-gpu"):
        _engine(provider="cuda")


@needs_int8
def test_auto_variant_is_int8_on_cpu() -> None:
    info = _engine().model()
    assert (info.variant, info.directory, info.provider) == ("int8", MODEL_DIR / "int8", CPU)
    assert choose_variant(MODEL_DIR, "cpu", "auto") == ("int8", MODEL_DIR / "int8")


def test_auto_variant_falls_back_to_fp32_when_not_built(renamed_copy: Callable[[str], Path]) -> None:
    plain = renamed_copy("plain")  # no sub-directories
    assert choose_variant(plain, "cpu", "auto") == ("fp32", plain)
    assert choose_variant(plain, "cuda", "auto") == ("fp32", plain)


def test_a_forced_variant_that_is_missing_names_the_path(renamed_copy: Callable[[str], Path]) -> None:
    plain = renamed_copy("bare")
    with pytest.raises(
        ModelDirectoryError, match=re.escape(f"{plain / 'fp16' / MANIFEST_FILE}") + ".*not built"
    ):
        choose_variant(plain, "cpu", "fp16")


def test_a_stale_variant_is_not_chosen(tmp_path: Path, renamed_copy: Callable[[str], Path]) -> None:
    # Copy a variant derived from the committed manifest under a directory whose manifest differs.
    parent = renamed_copy("stale")
    if not (MODEL_DIR / "int8" / MANIFEST_FILE).is_file():
        pytest.skip("models/en-fr-small/int8 is not built (`make setup` builds it)")
    shutil.copytree(MODEL_DIR / "int8", parent / "int8")
    assert choose_variant(parent, "cpu", "auto") == ("fp32", parent)
    with pytest.raises(ModelDirectoryError, match="stale"):
        choose_variant(parent, "cpu", "int8")


def test_several_models_by_name(renamed_copy: Callable[[str], Path]) -> None:
    other = renamed_copy("other")
    engine = _engine(model_dirs=(MODEL_DIR, other), variant="fp32", default_model="other")
    assert sorted(engine.models) == ["en-fr-small", "other"]
    assert engine.default_model == "other" and engine.model().directory == other
    cross = engine.encode("en-fr-small", SOURCES[:1])
    steps = []
    for name in ("other", "en-fr-small"):
        cache = engine.new_cache(name)
        cache.append(cross)
        steps.append(engine.step(name, np.array([1]), cache))
    np.testing.assert_array_equal(*steps)  # the same weights under two names


def test_the_same_name_twice_or_an_unknown_default_is_refused(renamed_copy: Callable[[str], Path]) -> None:
    with pytest.raises(ModelSetError, match=r"already served.*--model-dirs NAME=PATH"):
        _engine(model_dirs=(MODEL_DIR, MODEL_DIR), variant="fp32")
    with pytest.raises(ModelSetError, match="'v1' is already served"):
        _engine(model_dirs=(NamedModelDir("v1", MODEL_DIR), NamedModelDir("v1", MODEL_DIR)), variant="fp32")
    with pytest.raises(
        ModelSetError, match="'en-fr-small' is already served"
    ):  # a name may clash with a manifest's
        _engine(model_dirs=(MODEL_DIR, NamedModelDir("en-fr-small", MODEL_DIR)), variant="fp32")
    with pytest.raises(ModelSetError, match="default model 'nope'"):
        _engine(variant="fp32", default_model="nope")


def test_one_directory_served_under_two_names() -> None:
    engine = _engine(
        model_dirs=(NamedModelDir("en-fr-v2", MODEL_DIR), NamedModelDir("en-fr-v1", MODEL_DIR)),
        variant="fp32",
    )
    assert list(engine.models) == ["en-fr-v2", "en-fr-v1"] and engine.default_model == "en-fr-v2"
    manifest = load_manifest(MODEL_DIR)
    for name in engine.models:
        info = engine.model(name)
        assert (info.name, info.version, info.directory) == (name, manifest.version, MODEL_DIR)
    with pytest.raises(ModelNotFoundError):
        engine.model(manifest.name)  # served under the given names only


def test_unknown_model_is_model_not_found(fp32_engine: Engine) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        fp32_engine.encode("de-en", SOURCES)
    assert isinstance(err.value, KeyError)
    assert err.value.name == "de-en" and "en-fr-small" in str(err.value)


def test_encode_and_step_equal_the_graphs_called_directly(fp32_engine: Engine) -> None:
    graphs = OnnxGraphs(MODEL_DIR, intra_op_threads=1)
    dims = graphs.dims
    src_ids, src_mask = pad_ids(SOURCES, dims.pad_id)
    direct = graphs.encode(src_ids, src_mask)
    cross = fp32_engine.encode(None, SOURCES)
    np.testing.assert_array_equal(cross.k, direct.cross_k)
    np.testing.assert_array_equal(cross.mask, src_mask)

    rows, steps = len(SOURCES), 3
    cache = fp32_engine.new_cache(None)
    cache.append(cross)
    # The graph fed by hand: a buffer of `steps` slots, each step's new K/V written into it.
    shape = (dims.decoder_layers, rows, dims.heads, steps, dims.head_dim)
    past_k, past_v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    self_mask = np.zeros((rows, steps), dtype=bool)
    tokens = np.full(rows, dims.bos_id, dtype=np.int64)
    for position in range(steps):
        log_probs = fp32_engine.step(None, tokens, cache)
        out = graphs.step(
            tokens[:, None], np.full(rows, position), past_k, past_v, self_mask,
            direct.cross_k, direct.cross_v, src_mask,
        )  # fmt: skip
        past_k[:, :, :, position], past_v[:, :, :, position] = out.new_k, out.new_v
        self_mask[:, position] = True
        # The engine's cache has more (masked) slots than the hand-fed one: equal up to rounding.
        np.testing.assert_allclose(log_probs, out.log_probs, atol=1e-5)
        tokens = np.argmax(out.log_probs, axis=-1)
    inputs = cache.step_inputs()
    np.testing.assert_allclose(inputs.past_k[:, :, :, :steps], past_k, atol=1e-5)
    assert cache.lengths().tolist() == [steps] * rows


def test_rows_joining_later_get_their_own_positions(fp32_engine: Engine) -> None:
    """A newcomer joining a running batch (its own slots and position) steps as if alone."""
    bos = fp32_engine.model().dims.bos_id
    cache = fp32_engine.new_cache(None)
    cache.append(fp32_engine.encode(None, SOURCES[:1]))
    token_a = int(np.argmax(fp32_engine.step(None, np.array([bos]), cache)[0]))
    alone_cache = fp32_engine.new_cache(None)
    alone_cache.append(fp32_engine.encode(None, SOURCES[1:2]))
    alone = fp32_engine.step(None, np.array([bos]), alone_cache)
    cache.append(fp32_engine.encode(None, SOURCES[1:2]))
    together = fp32_engine.step(None, np.array([token_a, bos]), cache)
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)


def test_attention(fp32_engine: Engine) -> None:
    dims = fp32_engine.model().dims
    attention = fp32_engine.attention(None, SOURCES[:2], [[dims.bos_id, 40, 41], [dims.bos_id]])
    assert attention.log_probs.shape == (2, 3, dims.vocab_size)


@needs_int8
def test_int8_engine_equals_its_graphs() -> None:
    engine = _engine()
    sources = SOURCES[:1]
    assert translate_ids(engine.graphs(None), sources) == translate_ids(
        OnnxGraphs(MODEL_DIR / "int8"), sources
    )


def test_graph_runs_are_observed_and_warm_up_runs_every_graph() -> None:
    registry = CollectorRegistry()
    engine = Engine(
        EngineConfig(model_dirs=(MODEL_DIR,), variant="fp32", intra_op_threads=1), Metrics(registry)
    )
    engine.warm_up(steps=2)

    def runs(graph: str) -> float | None:
        return registry.get_sample_value(
            "translator_onnxruntime_run_duration_seconds_count", {"graph": graph}
        )

    assert (runs("encoder"), runs("decoder_step"), runs("attention")) == (1, 2, 1)
