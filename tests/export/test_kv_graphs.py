"""The committed edit graphs of the device KV cache are what export.onnx.kv_graphs builds."""

from __future__ import annotations

import pytest

from export.onnx.kv_graphs import EDITS, FLOAT_TYPES, OUT_DIR, build, file_name


@pytest.mark.parametrize("float_type", list(FLOAT_TYPES))
@pytest.mark.parametrize("edit", EDITS)
def test_the_committed_graph_is_fresh(edit: str, float_type: str) -> None:
    path = OUT_DIR / file_name(edit, float_type)
    assert path.is_file(), f"{path} is missing: run python -m export.onnx.kv_graphs"
    assert path.read_bytes() == build(edit, float_type), (
        f"{path} is stale: run python -m export.onnx.kv_graphs"
    )
