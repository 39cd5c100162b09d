"""Point the initializers of an exported ONNX graph into `model.safetensors`: one weight file.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON giving each
tensor's dtype, shape and `data_offsets` [begin, end) relative to the data section at byte 8 + N,
then the raw little-endian, row-major data — exactly ONNX's raw tensor layout. So an ONNX
initializer can reference a stored tensor in place as external data (location, offset, length)
and the graph file keeps only structure.

The exporter does not hand back the stored tensors untouched: constant folding turns a Linear
weight W (out, in) into a new initializer Wᵀ, and identical tensors get merged. Initializers are
therefore matched to stored tensors by content, not name; a transposed copy is replaced by the
stored tensor plus a Transpose node (onnxruntime folds it once when the session loads). An
initializer that matches nothing must be small or explicitly allowed (the positional table,
derived from the config and never stored), otherwise linking fails: the graph would carry
weights of its own.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Unmatched constants up to this size may stay inline: shape vectors, scalars, axes.
INLINE_LIMIT_BYTES = 4096

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    length: int  # bytes


def _content_key(dtype: np.dtype, shape: tuple[int, ...], data: bytes) -> tuple[str, tuple[int, ...], str]:
    return (dtype.str, shape, hashlib.sha256(data).hexdigest())


def _array_key(array: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return _content_key(little.dtype, tuple(little.shape), little.tobytes())


class SafetensorsIndex:
    """Where each tensor of a safetensors file lies, and a lookup by content."""

    def __init__(self, path: Path) -> None:
        self.path = path
        raw = path.read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
        data_start = 8 + header_len
        self.tensors: dict[str, StoredTensor] = {}
        self._by_content: dict[tuple[str, tuple[int, ...], str], str] = {}
        # Sorted names: when several stored tensors are equal, the first name wins, deterministically.
        for name in sorted(k for k in header if k != "__metadata__"):
            entry = header[name]
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                continue  # e.g. BF16: numpy has no such type, and our checkpoints hold none
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
            begin, end = entry["data_offsets"]
            tensor = StoredTensor(name, dtype, tuple(entry["shape"]), data_start + begin, end - begin)
            self.tensors[name] = tensor
            key = _content_key(dtype, tensor.shape, raw[tensor.offset : tensor.offset + tensor.length])
            self._by_content.setdefault(key, name)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every tensor, by name, as numpy arrays (read from the file; no safetensors package)."""
        raw = self.path.read_bytes()
        return {
            name: np.frombuffer(raw, t.dtype, count=t.length // t.dtype.itemsize, offset=t.offset).reshape(
                t.shape
            )
            for name, t in self.tensors.items()
        }

    def find(self, array: np.ndarray) -> StoredTensor | None:
        """The stored tensor with exactly this dtype, shape and content, if any."""
        name = self._by_content.get(_array_key(array))
        return None if name is None else self.tensors[name]


def _external(name: str, stored: StoredTensor, location: str) -> TensorProto:
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(stored.dtype)
    tensor.dims.extend(stored.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", stored.offset), ("length", stored.length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor


def _hoist_large_constants(graph: onnx.GraphProto) -> None:
    """Turn Constant nodes holding a large tensor into initializers, so that one pass links them."""
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and _nbytes(value.t) > INLINE_LIMIT_BYTES:
            tensor = TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def link_external_weights(
    model: onnx.ModelProto,
    weights: SafetensorsIndex,
    *,
    location: str,
    allowed_inline: Iterable[np.ndarray] = (),
) -> None:
    """Rewrite `model` in place so that its weights are external data inside `weights`.

    Args:
        model: an exported graph with inline initializers.
        weights: the checkpoint's safetensors file.
        location: the weight file's path relative to the graph file (ONNX external data location).
        allowed_inline: derived constants that may stay inline whatever their size.
    Raises:
        ValueError: a large initializer is neither a stored tensor, its transpose, nor allowed.
    """
    graph = model.graph
    _hoist_large_constants(graph)
    allowed = {_array_key(a) for a in allowed_inline}
    taken = {t.name for t in graph.initializer}
    linked: list[TensorProto] = []
    transposes: list[onnx.NodeProto] = []
    stored_as: dict[str, str] = {}  # stored tensor name → initializer name already referencing it
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        stored = weights.find(array)
        if stored is not None:
            linked.append(_external(init.name, stored, location))
            continue
        stored = weights.find(array.T) if array.ndim == 2 else None
        if stored is not None:
            # A constant-folded Wᵀ: reference W and transpose it in the graph instead.
            source = stored_as.get(stored.name)
            if source is None:
                source = _unique(f"weights/{stored.name}", taken)
                linked.append(_external(source, stored, location))
                stored_as[stored.name] = source
            transposes.append(
                helper.make_node(
                    "Transpose", [source], [init.name], perm=[1, 0], name=f"{init.name}/from_stored"
                )
            )
            continue
        if array.nbytes > INLINE_LIMIT_BYTES and _array_key(array) not in allowed:
            raise ValueError(
                f"initializer {init.name!r} {list(array.shape)} {array.dtype} matches no tensor of "
                f"{weights.path.name} (nor its transpose): the graph would carry its own weights"
            )
        linked.append(init)
    del graph.initializer[:]
    graph.initializer.extend(linked)
    # Initializers are available before any node runs, so the Transposes can go first.
    nodes = [*transposes, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


def _nbytes(tensor: TensorProto) -> int:
    return int(numpy_helper.to_array(tensor).nbytes)


def inline_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data carried inside the graph file (initializers and Constant nodes)."""
    graph = model.graph
    total = sum(_nbytes(t) for t in graph.initializer if t.data_location != TensorProto.EXTERNAL)
    for node in graph.node:
        total += sum(_nbytes(a.t) for a in node.attribute if a.name == "value")
    return total
