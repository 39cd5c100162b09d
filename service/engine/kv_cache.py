"""The KV caches of a batch of decoder rows: pre-allocated buffers written in place.

The decoder-step graph (docs/model-directory.md) takes each layer's past keys/values as an input of
its own and returns only the new token's keys/values; `KVCache` keeps, for the rows of a batch:

- the self-attention keys/values, (L, row capacity, H, slot capacity, Dh) each: row r's real
  slots are 0 … length[r] − 1, and a step's new K/V goes into slot length[r];
- the cross-attention keys/values from the encoder, (L, row capacity, H, source capacity, Dh),
  with each row's source mask.

Why this shape: the live rows always occupy the first `rows` physical rows, so every graph input is
the view buffer[l, :rows] — contiguous, handed to onnxruntime without a copy — and a step writes
one slot per row instead of copying the whole cache. Callers see the rows in their own order
(a request's beams together); physically, a row that leaves is filled by the last row (one row
copied, not the tail), so `to_physical` / `to_logical` translate per-row arrays. Capacities grow
in chunks when a row or a source needs more; the slot capacity shrinks again once the long rows
have gone, because every step attends over all of it (masked) and costs in proportion. (The
scheduler's KV budget counts rows × their longest length limit; what is held can exceed that by
the rounding to a chunk, at most chunk − 1 slots per row.)

A step either returns the new K/V for `record` to write (the traced graphs), or, with the int8 and
optimized variants' in-place step, writes them into the buffers itself (bound by address,
service/engine/graphs.py), after which `wrote_slots` counts them.

Host memory (numpy), for CPU; on CUDA the engine uses service/engine/device_kv_cache.py instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True, eq=False)
class KV:
    """Keys and values of a batch of rows with the mask of their slots: the encoder's
    cross-attention K/V (slots: source tokens) as `encode` returns them."""

    k: np.ndarray  # (L, B, H, T, Dh)
    v: np.ndarray  # (L, B, H, T, Dh)
    mask: np.ndarray  # (B, T) bool, True at real slots

    def __post_init__(self) -> None:
        assert self.k.shape == self.v.shape and self.k.ndim == 5, (self.k.shape, self.v.shape)
        assert self.mask.shape == (self.k.shape[1], self.k.shape[3]), (self.mask.shape, self.k.shape)

    @property
    def rows(self) -> int:
        return int(self.k.shape[1])

    @property
    def slots(self) -> int:
        return int(self.k.shape[3])

    def take(self, rows: np.ndarray | Sequence[int]) -> KV:
        """Rows `rows`, in that order (repeats allowed)."""
        index = np.asarray(rows, dtype=np.int64)
        return KV(np.take(self.k, index, axis=1), np.take(self.v, index, axis=1), self.mask[index])


class BatchCache(Protocol):
    """What a scheduler does with a batch's cache, wherever it lives: `KVCache` (host memory) or
    `service.engine.device_kv_cache.DeviceKVCache` (the execution provider's); a decoder step goes
    through `OnnxGraphs.step_cache`."""

    @property
    def rows(self) -> int: ...

    @property
    def kv_tokens(self) -> int:
        """Self-attention slots held by the live rows."""
        ...

    def append(self, cross: KV) -> None: ...

    def keep(self, parents: np.ndarray | Sequence[int]) -> None: ...


@dataclass(frozen=True, eq=False)
class StepInputs:
    """A decoder step's cache inputs, rows in physical order (views of the buffers, not copies)."""

    positions: np.ndarray  # (R,) int64: each row's slot count = the new token's position = its slot
    past_k: np.ndarray  # (L, R, H, T, Dh); past_k[l] is contiguous
    past_v: np.ndarray
    cross_k: np.ndarray  # (L, R, H, S, Dh); cross_k[l] is contiguous
    cross_v: np.ndarray
    src_mask: np.ndarray  # (R, S) bool, contiguous
    generation: int = 0  # changes whenever the buffers are reallocated (see `KVCache.generation`)

    @property
    def self_mask(self) -> np.ndarray:
        """(R, T) bool: the real past slots (each row's first `positions[r]`)."""
        return np.arange(self.past_k.shape[3]) < self.positions[:, None]


class KVCache:
    """Self- and cross-attention K/V of a batch's rows (see the module docstring).

    Args:
        layers, heads, head_dim: the decoder's.
        dtype: of the keys/values (float32, or float16 for the fp16 variant).
        chunk: slots and source tokens are allocated in multiples of it.
    """

    def __init__(
        self, layers: int, heads: int, head_dim: int, dtype: np.dtype | type, *, chunk: int = 16
    ) -> None:
        self.layers, self.heads, self.head_dim, self.dtype, self.chunk = layers, heads, head_dim, dtype, chunk
        self._rows = 0
        self._order = np.zeros(0, dtype=np.int64)  # logical row → physical row
        # Counts reallocations of the buffers: a step graph bound to them (the in-place step's
        # IOBinding, service/engine/graphs.py) binds again when it changes or the rows do.
        self.generation = 0
        self._release()

    def _release(self) -> None:
        """Empty buffers. Zeros, never garbage, in the slots a row has not written: a masked slot
        gets probability 0, and 0 × NaN would still be NaN."""
        self.generation += 1
        empty = (self.layers, 0, self.heads, 0, self.head_dim)
        self._k, self._v = np.zeros(empty, self.dtype), np.zeros(empty, self.dtype)
        self._length = np.zeros(0, dtype=np.int64)  # real self-attention slots per physical row
        self._cross_k, self._cross_v = np.zeros(empty, self.dtype), np.zeros(empty, self.dtype)
        self._src_mask = np.zeros((0, 0), dtype=bool)

    # --- sizes ---------------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def slots(self) -> int:
        """Self-attention slots per row: the capacity every step attends over."""
        return int(self._k.shape[3])

    @property
    def source_slots(self) -> int:
        return int(self._cross_k.shape[3])

    @property
    def kv_tokens(self) -> int:
        """Self-attention slots held by the live rows (rows × slot capacity)."""
        return self._rows * self.slots

    def lengths(self) -> np.ndarray:
        """(R,) real self-attention slots of each row, logical order."""
        return self._length[self._order]

    # --- rows joining and leaving --------------------------------------------------------------------

    def append(self, cross: KV) -> None:
        """New rows after the others, one per row of `cross` (the encoder's K/V), with empty caches."""
        n, m = self._rows, cross.rows
        self._reserve(n + m, self.slots, max(self.source_slots, _round_up(cross.slots, self.chunk)))
        s = cross.slots
        self._cross_k[:, n : n + m, :, :s] = cross.k
        self._cross_v[:, n : n + m, :, :s] = cross.v
        self._src_mask[n : n + m] = False
        self._src_mask[n : n + m, :s] = cross.mask
        self._length[n : n + m] = 0
        self._order = np.concatenate([self._order, np.arange(n, n + m, dtype=np.int64)])
        self._rows = n + m

    def keep(self, parents: np.ndarray | Sequence[int]) -> None:
        """Logical row i continues old logical row parents[i] (beam back-pointers; repeats copy the
        row); rows no one continues leave. Copies only the rows that have to move."""
        parents = np.asarray(parents, dtype=np.int64)
        n_old, n_new = self._rows, len(parents)
        if n_new == n_old and np.array_equal(parents, np.arange(n_old)):
            return
        source = self._order[parents]  # the physical row each new row continues
        if n_new < 2 or bool(np.all(parents[1:] > parents[:-1])):  # no repeats: rows only leave
            first = np.ones(n_new, dtype=bool)
        else:
            first = np.zeros(n_new, dtype=bool)
            first[np.unique(source, return_index=True)[1]] = True
        physical = np.where(first, source, -1)
        # A branching beam gets a copy of its parent: in a row that was left, else past the old rows.
        repeats = np.flatnonzero(~first)
        if len(repeats):
            taken = np.zeros(n_old, dtype=bool)
            taken[source[first]] = True
            free = np.flatnonzero(~taken)
            extra = max(0, len(repeats) - len(free))
            spare = np.concatenate([free, np.arange(n_old, n_old + extra, dtype=np.int64)])[: len(repeats)]
            self._reserve(n_old + extra, self.slots, self.source_slots)
            self._copy(spare, source[repeats])
            physical[repeats] = spare
        # Live rows back to 0 … n_new − 1: the ones past it move into the holes.
        outside = np.flatnonzero(physical >= n_new)
        if len(outside):
            used = np.zeros(n_new, dtype=bool)
            used[physical[physical < n_new]] = True
            holes = np.flatnonzero(~used)
            self._copy(holes, physical[outside])
            physical[outside] = holes
        self._order, self._rows = physical, n_new
        self._shrink()

    def _copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Physical rows src → dst (disjoint), their real slots only."""
        slots = int(self._length[src].max(initial=0))
        self._k[:, dst, :, :slots] = self._k[:, src, :, :slots]
        self._v[:, dst, :, :slots] = self._v[:, src, :, :slots]
        self._cross_k[:, dst] = self._cross_k[:, src]
        self._cross_v[:, dst] = self._cross_v[:, src]
        self._src_mask[dst] = self._src_mask[src]
        self._length[dst] = self._length[src]

    # --- a decoder step ------------------------------------------------------------------------------

    def step_inputs(self) -> StepInputs:
        """The cache inputs of the next step (physical order), with room for its new slot."""
        n = self._rows
        self._room_for_a_slot()
        length = self._length[:n]
        return StepInputs(
            positions=length.copy(),
            past_k=self._k[:, :n],
            past_v=self._v[:, :n],
            cross_k=self._cross_k[:, :n],
            cross_v=self._cross_v[:, :n],
            src_mask=self._src_mask[:n],
            generation=self.generation,
        )

    def record(self, new_k: np.ndarray, new_v: np.ndarray) -> None:
        """Write a step's new keys/values, (L, R, H, Dh) in physical order, into each row's next slot."""
        n = self._rows
        self._room_for_a_slot()
        rows, slots = np.arange(n), self._length[:n]
        # Two advanced indices around a slice: numpy puts their axis first, (R, L, H, Dh).
        self._k[:, rows, :, slots] = new_k.transpose(1, 0, 2, 3)
        self._v[:, rows, :, slots] = new_v.transpose(1, 0, 2, 3)
        self.wrote_slots()

    def wrote_slots(self) -> None:
        """Each row's next slot now holds its new keys/values (written by `record`, or by an
        in-place step itself)."""
        self._length[: self._rows] += 1

    def to_physical(self, values: np.ndarray) -> np.ndarray:
        """Per-row values (R, …) from logical to physical order."""
        out = np.empty_like(values)
        out[self._order] = values
        return out

    def to_logical(self, values: np.ndarray) -> np.ndarray:
        """Per-row values (R, …) from physical to logical order."""
        return values[self._order]

    # --- capacity ------------------------------------------------------------------------------------

    def _room_for_a_slot(self) -> None:
        needed = int(self._length[: self._rows].max(initial=0)) + 1
        if needed > self.slots:
            self._reserve(self._rows, _round_up(needed, self.chunk), self.source_slots)

    def _reserve(self, rows: int, slots: int, sources: int) -> None:
        """At least this capacity (rows double; slots and sources as given), keeping the live rows."""
        cap_rows, cap_slots, cap_sources = self._k.shape[1], self.slots, self.source_slots
        if rows <= cap_rows and slots <= cap_slots and sources <= cap_sources:
            return
        self._resize(
            max(rows, 2 * cap_rows) if rows > cap_rows else cap_rows,
            max(slots, cap_slots),
            max(sources, cap_sources),
        )

    def _shrink(self) -> None:
        """Release slot and source capacity that no live row needs any more (with some slack, so
        that a batch hovering around a size does not reallocate at every step)."""
        n = self._rows
        if n == 0:
            self._release()
            return
        slots = _round_up(int(self._length[:n].max()) + 1, self.chunk)
        used = np.flatnonzero(self._src_mask[:n].any(axis=0))
        sources = _round_up(int(used[-1]) + 1 if len(used) else 0, self.chunk)
        if self.slots - slots >= 2 * self.chunk or self.source_slots - sources >= 2 * self.chunk:
            self._resize(self._k.shape[1], min(slots, self.slots), min(sources, self.source_slots))

    def _resize(self, rows: int, slots: int, sources: int) -> None:
        """New buffers where a capacity changes (the self- and cross-attention sides apart: the
        slots grow as rows decode, the sources only when a longer one joins), live rows copied."""
        n, cap_rows = self._rows, self._k.shape[1]
        self.generation += 1
        if rows != cap_rows or slots != self.slots:
            keep = min(slots, self.slots)
            k, v, length = self._k, self._v, self._length
            self._k = np.zeros((self.layers, rows, self.heads, slots, self.head_dim), self.dtype)
            self._v = np.zeros_like(self._k)
            self._length = np.zeros(rows, dtype=np.int64)
            self._k[:, :n, :, :keep] = k[:, :n, :, :keep]
            self._v[:, :n, :, :keep] = v[:, :n, :, :keep]
            self._length[:n] = length[:n]
        if rows != cap_rows or sources != self.source_slots:
            keep = min(sources, self.source_slots)
            cross_k, cross_v, src_mask = self._cross_k, self._cross_v, self._src_mask
            self._cross_k = np.zeros((self.layers, rows, self.heads, sources, self.head_dim), self.dtype)
            self._cross_v = np.zeros_like(self._cross_k)
            self._src_mask = np.zeros((rows, sources), dtype=bool)
            self._cross_k[:, :n, :, :keep] = cross_k[:, :n, :, :keep]
            self._cross_v[:, :n, :, :keep] = cross_v[:, :n, :, :keep]
            self._src_mask[:n, :keep] = src_mask[:n, :keep]


def _round_up(n: int, chunk: int) -> int:
    return -(-n // chunk) * chunk
