"""KVCache: rows join, step, branch and leave; the graph inputs are views; every row keeps its own slots."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.kv_cache import KV, KVCache

L, H, DH = 2, 1, 1


def cross_of(*sources: list[int]) -> KV:
    """Cross K/V whose slots hold the source ids (k) and their negatives (v)."""
    width = max(len(s) for s in sources)
    k = np.zeros((L, len(sources), H, width, DH), np.float32)
    mask = np.zeros((len(sources), width), bool)
    for row, source in enumerate(sources):
        k[:, row, 0, : len(source), 0], mask[row, : len(source)] = source, True
    return KV(k, -k, mask)


def step(cache: KVCache, tokens: list[int]) -> None:
    """A decoder step whose new K/V is the row's token (layer l: token + 1000·l)."""
    physical = cache.to_physical(np.asarray(tokens, np.float32))
    new = np.stack([physical + 1000 * layer for layer in range(L)])[:, :, None, None]  # (L, R, H, Dh)
    cache.record(new, -new)


def pasts(cache: KVCache) -> list[list[int]]:
    """Each logical row's real past slots (layer 0's K), from the step inputs the graph would get."""
    inputs = cache.step_inputs()
    rows = [[int(t) for t in inputs.past_k[0, r, 0, inputs.self_mask[r], 0]] for r in range(cache.rows)]
    for layer in range(L):  # the other layer and V agree
        for r in range(cache.rows):
            real = inputs.past_k[layer, r, 0, inputs.self_mask[r], 0]
            assert [int(t) - 1000 * layer for t in real] == rows[r]
            np.testing.assert_array_equal(inputs.past_v[layer, r, 0, inputs.self_mask[r], 0], -real)
    return [rows[int(p)] for p in np.argsort(cache.to_physical(np.arange(cache.rows)))]


def sources_of(cache: KVCache) -> list[list[int]]:
    inputs = cache.step_inputs()
    rows = [[int(t) for t in inputs.cross_k[0, r, 0, inputs.src_mask[r], 0]] for r in range(cache.rows)]
    return [rows[int(p)] for p in np.argsort(cache.to_physical(np.arange(cache.rows)))]


def test_graph_inputs_are_contiguous_views_of_the_buffers() -> None:
    cache = KVCache(L, H, DH, np.float32, chunk=4)
    cache.append(cross_of([5, 6, 2], [7, 2]))
    inputs = cache.step_inputs()
    assert inputs.positions.tolist() == [0, 0] and not inputs.self_mask.any()
    assert inputs.self_mask.shape == (2, 4) and inputs.src_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    for layer in range(L):
        for array in (inputs.past_k, inputs.past_v, inputs.cross_k, inputs.cross_v):
            assert array[layer].flags.c_contiguous  # fed to onnxruntime without a copy
    step(cache, [1, 1])
    assert np.shares_memory(cache.step_inputs().past_k, inputs.past_k)  # written in place


def test_each_step_fills_the_next_slot_of_every_row() -> None:
    cache = KVCache(L, H, DH, np.float32, chunk=4)
    cache.append(cross_of([5, 2]))
    step(cache, [1])
    cache.append(cross_of([6, 7, 2]))  # joins one step later
    step(cache, [10, 1])
    step(cache, [11, 20])
    assert pasts(cache) == [[1, 10, 11], [1, 20]]
    assert sources_of(cache) == [[5, 2], [6, 7, 2]]
    assert cache.lengths().tolist() == [3, 2] and cache.step_inputs().positions.tolist() == [3, 2]


def test_rows_leave_branch_and_keep_their_order() -> None:
    cache = KVCache(L, H, DH, np.float32, chunk=4)
    cache.append(cross_of([3, 2], [4, 2], [5, 2], [6, 2]))
    step(cache, [1, 1, 1, 1])
    step(cache, [10, 20, 30, 40])
    cache.keep([3, 1])  # rows 0 and 2 leave; the survivors swap order
    assert pasts(cache) == [[1, 40], [1, 20]] and sources_of(cache) == [[6, 2], [4, 2]]
    cache.keep([0, 0, 1])  # a beam branches: row 0 twice
    step(cache, [41, 42, 21])
    assert pasts(cache) == [[1, 40, 41], [1, 40, 42], [1, 20, 21]]
    assert sources_of(cache) == [[6, 2], [6, 2], [4, 2]]
    cache.keep([])
    assert cache.rows == 0 and cache.kv_tokens == 0


def test_capacity_grows_in_chunks_and_shrinks_when_long_rows_leave() -> None:
    cache = KVCache(L, H, DH, np.float32, chunk=4)
    cache.append(cross_of([1] * 9))
    assert cache.source_slots == 12
    for t in range(10):
        step(cache, [t])
    assert cache.slots >= 11 and cache.slots % 4 == 0
    cache.append(cross_of([2, 2]))
    step(cache, [50, 60])
    cache.keep([1])  # the long row leaves: its slots and its long source are released
    assert cache.slots == 4 and cache.source_slots == 4
    assert pasts(cache) == [[60]] and sources_of(cache) == [[2, 2]]
    assert cache.kv_tokens == 4


@pytest.mark.parametrize("seed", range(5))
def test_random_joins_steps_branches_and_exits_keep_every_row_intact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cache = KVCache(L, H, DH, np.float32, chunk=3)
    rows: list[tuple[list[int], list[int]]] = []  # (source, past) per logical row
    token = 1
    for _ in range(60):
        if not rows or rng.random() < 0.3:
            new = [
                [int(x) for x in rng.integers(3, 99, rng.integers(1, 8))] for _ in range(rng.integers(1, 4))
            ]
            cache.append(cross_of(*new))
            rows += [(s, []) for s in new]
        tokens = list(range(token, token + len(rows)))
        token += len(rows)
        step(cache, tokens)
        rows = [(s, [*p, t]) for (s, p), t in zip(rows, tokens, strict=True)]
        parents = sorted(rng.choice(len(rows), size=rng.integers(0, len(rows) + 2)).tolist())
        cache.keep(parents)
        rows = [rows[p] for p in parents]
        if rows:
            assert pasts(cache) == [p for _, p in rows]
            assert sources_of(cache) == [s for s, _ in rows]
        assert cache.rows == len(rows)
