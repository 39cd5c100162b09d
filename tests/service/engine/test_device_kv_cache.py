"""DeviceKVCache: the CUDA path's KV cache (IOBinding, edit graphs), run here on the CPU provider
against the host KVCache: same log-probs, same caches, whatever joins, branches and leaves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.config import EngineConfig
from service.engine.device_kv_cache import DeviceKVCache
from service.engine.engine import Engine, device_cache_difference
from service.engine.graphs import OnnxGraphs, encode_sources
from service.engine.kv_cache import KVCache
from service.modeldir.manifest import ModelDirectoryError

MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "en-fr-small"


@pytest.fixture(scope="module")
def graphs() -> OnnxGraphs:
    return OnnxGraphs(MODEL_DIR, intra_op_threads=1)


def host_rows(cache: KVCache) -> list[np.ndarray]:
    """Each row's real self-attention keys, (L, H, length, Dh), logical order."""
    inputs = cache.step_inputs()
    order = np.argsort(cache.to_physical(np.arange(cache.rows)))  # logical row → physical row
    return [inputs.past_k[:, r, :, : int(inputs.positions[r])] for r in order]


def device_rows(cache: DeviceKVCache) -> list[np.ndarray]:
    k = cache.to_host()["past_k"]
    return [k[:, r, :, cache.slots - n :] for r, n in enumerate(cache.lengths())]


@pytest.mark.parametrize("seed", range(4))
def test_random_joins_steps_branches_and_exits_match_the_host_cache(graphs: OnnxGraphs, seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = graphs.dims
    words = [t for t in range(d.vocab_size) if t not in (d.pad_id, d.bos_id, d.eos_id)]
    host, device = graphs.new_cache(), graphs.new_device_cache()
    tokens = np.zeros(0, dtype=np.int64)
    for _ in range(25):
        if host.rows == 0 or rng.random() < 0.3:
            sources = [
                [*rng.choice(words, rng.integers(1, 12)).tolist(), d.eos_id]
                for _ in range(rng.integers(1, 4))
            ]
            for cache in (host, device):
                cache.append(encode_sources(graphs, sources))
            tokens = np.concatenate([tokens, np.full(len(sources), d.bos_id)])
        expected, got = graphs.step_cache(tokens, host), graphs.step_cache(tokens, device)
        np.testing.assert_allclose(got, expected, atol=1e-4)
        tokens = np.argmax(expected, axis=-1).astype(np.int64)  # both go on with the same tokens
        parents = sorted(rng.choice(host.rows, size=rng.integers(0, host.rows + 2)).tolist())
        for cache in (host, device):
            cache.keep(parents)
        tokens = tokens[parents]
        assert device.rows == host.rows and device.lengths().tolist() == host.lengths().tolist()
        if host.rows:
            longest = int(host.lengths().max())
            # no slot column beyond the longest row's, but the first masked one until a keep drops it
            assert max(1, longest) <= device.slots <= longest + 1
            for want, have in zip(host_rows(host), device_rows(device), strict=True):
                np.testing.assert_allclose(have, want, atol=1e-5)


def test_an_emptied_cache_takes_new_rows(graphs: OnnxGraphs) -> None:
    d = graphs.dims
    cache = graphs.new_device_cache()
    cache.append(encode_sources(graphs, [[5, 6, d.eos_id]]))
    graphs.step_cache(np.array([d.bos_id]), cache)
    cache.keep([])
    assert (cache.rows, cache.slots, cache.kv_tokens) == (0, 0, 0)
    cache.append(encode_sources(graphs, [[7, d.eos_id], [8, 9, 10, d.eos_id]]))
    assert graphs.step_cache(np.array([d.bos_id, d.bos_id]), cache).shape == (2, d.vocab_size)
    assert (cache.rows, cache.slots, cache.kv_tokens) == (2, 2, 4)  # a masked column, then the new one


def test_the_engine_checks_the_device_cache_and_keeps_host_memory_on_cpu(graphs: OnnxGraphs) -> None:
    assert device_cache_difference(graphs) < 1e-4
    auto = Engine(EngineConfig(model_dirs=(MODEL_DIR,), variant="fp32", intra_op_threads=1))
    assert auto.model().kv_cache == "host" and isinstance(auto.new_cache(None), KVCache)
    forced = Engine(
        EngineConfig(model_dirs=(MODEL_DIR,), variant="fp32", intra_op_threads=1, kv_cache="device")
    )
    assert forced.model().kv_cache == "device" and isinstance(forced.new_cache(None), DeviceKVCache)


def test_the_in_place_step_refuses_a_forced_device_cache_in_one_line() -> None:
    config = EngineConfig(model_dirs=(MODEL_DIR,), variant="int8", intra_op_threads=1, kv_cache="device")
    with pytest.raises(ModelDirectoryError, match=r"in-place decoder step needs the host KV cache"):
        Engine(config)
