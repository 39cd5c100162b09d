"""A batch's KV cache in the execution provider's memory (CUDA), edited there between steps.

`KVCache` (service/engine/kv_cache.py) keeps the caches in host memory and writes each step's new slot
in place; on CUDA, onnxruntime would copy every layer's past keys/values to the device at every
step and the new ones back. `DeviceKVCache` keeps them on the device as onnxruntime values:

- the decoder step runs under an IOBinding: each layer's past and cross keys/values are bound
  straight from the stacked device tensors (layer l is a contiguous block of (L, R, H, T, Dh), bound
  by address, no copy); the new token's keys/values stay on the device; only the log-probs (for
  choosing the next tokens on the host) and the small per-row inputs (tokens, positions, masks)
  cross over;
- the edits between steps — the new slot, rows leaving or branching, rows joining — run on the
  device as the tiny graphs of service/engine/kv_graphs/ (export/onnx/kv_graphs.py), model-independent since
  they work on the stacked tensors. Each makes a new tensor (onnxruntime has no in-place update):
  one pass over the cache per step, which device memory bandwidth makes small next to the step.

Slots are right-aligned, not left-aligned as in `KVCache`: row r's real slots are its last
length[r] of the T columns, so a step's new slot is one new column for every row (a Concat).
Rows are kept in the callers' order (a `select` reorders them), so there is no physical order to
translate. The encoder's cross-attention K/V arrive as host arrays and are uploaded once, when
their rows join.

The engine checks this cache against `KVCache` at warm-up and falls back to host memory if they
disagree (service/engine/engine.py). On CPU it runs too, through the same IOBinding path with
onnxruntime's CPU allocator — which is how the tests check it — but there it only adds copies.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np
import onnxruntime as ort

from service.engine.kv_cache import KV

EDITS = ("append", "select", "join")
# At least one slot column (masked while no row has written it): a tensor with a zero-sized axis may
# have no device address to bind.
_MIN_SLOTS = 1
# The stacked caches, by the names the edit graphs' inputs (and, per layer, the step's) give them;
# the join and select graphs return them in this order, the append graph the first two.
_TENSORS = ("past_k", "past_v", "cross_k", "cross_v")


class KVEditGraphs:
    """The three edit graphs for one float type, as sessions on one device."""

    def __init__(self, dtype: np.dtype | type, providers: list[str], device: str, device_id: int = 0) -> None:
        self.dtype, self.device, self.device_id = np.dtype(dtype), device, device_id
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # copies and concatenations
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {
            edit: ort.InferenceSession(_graph_bytes(edit, self.dtype.name), options, providers=providers)
            for edit in EDITS
        }

    def upload(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def run(self, edit: str, inputs: Mapping[str, ort.OrtValue | np.ndarray]) -> list[ort.OrtValue]:
        """Run one edit; OrtValue inputs stay where they are, numpy ones come from the host; every
        output is left on the device, in the graph's output order."""
        session = self.sessions[edit]
        binding = session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for output in session.get_outputs():
            binding.bind_output(output.name, self.device, self.device_id)
        session.run_with_iobinding(binding)
        return list(binding.get_outputs())


@functools.cache
def _graph_bytes(edit: str, float_type: str) -> bytes:
    return resources.files("service.engine").joinpath("kv_graphs", f"{float_type}_{edit}.onnx").read_bytes()


class DeviceKVCache:
    """Self- and cross-attention K/V of a batch's rows on the device (see the module docstring).

    Args:
        step: the decoder-step session (on the same device as `edits`).
        edits: the edit graphs' sessions.
        layers, heads, head_dim: the decoder's.
    """

    def __init__(
        self, step: ort.InferenceSession, edits: KVEditGraphs, layers: int, heads: int, head_dim: int
    ) -> None:
        self._step, self._edits = step, edits
        self.layers, self.heads, self.head_dim, self.dtype = layers, heads, head_dim, edits.dtype
        self._clear()

    def _clear(self) -> None:
        # past_k, past_v (L, R, H, T, Dh) and cross_k, cross_v (L, R, H, S, Dh), named as the edit
        # graphs' inputs; empty while there are no rows
        self._tensors: dict[str, ort.OrtValue] = {}
        self._length = np.zeros(0, dtype=np.int64)  # real slots per row: its last length[r]
        self._src_mask = np.zeros((0, 0), dtype=bool)
        self._slots = 0  # T

    def _replace(self, names: tuple[str, ...], values: list[ort.OrtValue]) -> None:
        self._tensors.update(zip(names, values, strict=True))

    # --- sizes ---------------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self._length)

    @property
    def slots(self) -> int:
        """Self-attention slots per row: what every step attends over (the longest row's length,
        at least _MIN_SLOTS)."""
        return self._slots

    @property
    def kv_tokens(self) -> int:
        return self.rows * self.slots

    def lengths(self) -> np.ndarray:
        return self._length.copy()

    # --- rows joining and leaving --------------------------------------------------------------------

    def append(self, cross: KV) -> None:
        """New rows after the others, one per row of `cross` (uploaded), with empty caches."""
        m, edits = cross.rows, self._edits
        new_k, new_v = edits.upload(cross.k.astype(self.dtype)), edits.upload(cross.v.astype(self.dtype))
        if not self._tensors:
            empty = np.zeros((self.layers, m, self.heads, _MIN_SLOTS, self.head_dim), self.dtype)
            self._replace(_TENSORS, [edits.upload(empty), edits.upload(empty), new_k, new_v])
            self._length, self._src_mask, self._slots = np.zeros(m, np.int64), cross.mask.copy(), _MIN_SLOTS
            return
        sources, new_sources = self._src_mask.shape[1], cross.slots
        width = max(sources, new_sources)
        new_past = [self.layers, m, self.heads, self._slots, self.head_dim]
        joined = edits.run(
            "join",
            {
                **self._tensors,
                "new_cross_k": new_k,
                "new_cross_v": new_v,
                "new_past_shape": np.array(new_past, np.int64),
                "cross_pads": _pad_slots(width - sources),
                "new_cross_pads": _pad_slots(width - new_sources),
            },
        )
        self._replace(_TENSORS, joined)
        mask = np.zeros((self.rows + m, width), dtype=bool)
        mask[: self.rows, :sources] = self._src_mask
        mask[self.rows :, :new_sources] = cross.mask
        self._src_mask = mask
        self._length = np.concatenate([self._length, np.zeros(m, np.int64)])

    def keep(self, parents: np.ndarray | Sequence[int]) -> None:
        """Row i continues old row parents[i] (repeats copy the row); rows no one continues leave."""
        parents = np.asarray(parents, dtype=np.int64)
        if len(parents) == self.rows and np.array_equal(parents, np.arange(self.rows)):
            return
        if len(parents) == 0:
            self._clear()
            return
        length, src_mask = self._length[parents], self._src_mask[parents]
        slots = max(_MIN_SLOTS, int(length.max()))
        used = np.flatnonzero(src_mask.any(axis=0))
        sources = int(used[-1]) + 1 if len(used) else 1
        selected = self._edits.run(
            "select",
            {
                **self._tensors,
                "rows": parents,
                "first_slot": np.array([self._slots - slots], np.int64),
                "sources": np.array([sources], np.int64),
            },
        )
        self._replace(_TENSORS, selected)
        self._length, self._src_mask, self._slots = length, src_mask[:, :sources].copy(), slots

    # --- a decoder step ------------------------------------------------------------------------------

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """One decoder step for every row: tokens (R,) → log_probs (R, V) float32; each row's
        new keys/values become its last slot, on the device."""
        n, slots, edits = self.rows, self._slots, self._edits
        binding = self._step.io_binding()
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64).reshape(n, 1))
        binding.bind_cpu_input("positions", self._length.copy())
        binding.bind_cpu_input("self_mask", np.arange(slots) >= (slots - self._length)[:, None])
        binding.bind_cpu_input("src_mask", np.ascontiguousarray(self._src_mask))
        for name, stacked in self._tensors.items():
            self._bind_layers(binding, name, stacked)
        binding.bind_output("log_probs", "cpu")
        binding.bind_output("new_k", edits.device, edits.device_id)
        binding.bind_output("new_v", edits.device, edits.device_id)
        self._step.run_with_iobinding(binding)
        log_probs, new_k, new_v = binding.get_outputs()
        past = {name: self._tensors[name] for name in _TENSORS[:2]}
        self._replace(_TENSORS[:2], edits.run("append", {**past, "new_k": new_k, "new_v": new_v}))
        self._length = self._length + 1
        self._slots += 1
        return np.asarray(log_probs.numpy())

    def _bind_layers(self, binding: Any, name: str, stacked: ort.OrtValue) -> None:
        """Layer l of a stacked (L, …) tensor is input `{name}_{l}`, bound at its address: a view."""
        shape = stacked.shape()
        per_layer = list(shape[1:])
        step = int(np.prod(per_layer)) * self.dtype.itemsize
        base = stacked.data_ptr()
        for layer in range(self.layers):
            binding.bind_input(
                f"{name}_{layer}",
                self._edits.device,
                self._edits.device_id,
                self.dtype.type,
                per_layer,
                base + layer * step,
            )

    # --- checks --------------------------------------------------------------------------------------

    def to_host(self) -> dict[str, np.ndarray]:
        """The caches copied to host memory, by name (past_k, past_v, cross_k, cross_v), for tests."""
        return {name: value.numpy() for name, value in self._tensors.items()}


def _pad_slots(after: int) -> np.ndarray:
    """ONNX Pad's pads for a (L, R, H, S, Dh) tensor: `after` zeros at the end of S."""
    pads = np.zeros(10, dtype=np.int64)
    pads[5 + 3] = after
    return pads
