"""make verify's checks on the committed default model (a sample of the test set; make verify
decodes all of it)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnx.numpy_helper
import pytest
import torch

from export.onnx.verify import Check, compare_exports, run_checks
from export.translate import DEFAULT_MODEL_DIR
from service.modeldir.manifest import MANIFEST_FILE, sha256_file


@pytest.fixture(scope="module")
def checks(
    corpus_splits: dict[str, list[tuple[str, str]]], tmp_path_factory: pytest.TempPathFactory
) -> list[Check]:
    # The corpus fixture's test split, written where run_checks reads it.
    corpus_dir = Path(tmp_path_factory.mktemp("corpus"))
    lines = "".join(f"{en}\t{fr}\n" for en, fr in corpus_splits["test"])
    (corpus_dir / "test.tsv").write_text(lines, encoding="utf-8")
    torch.set_num_threads(2)
    return run_checks(DEFAULT_MODEL_DIR, corpus_dir, sentences=120)


@pytest.mark.parametrize(
    "name", ["manifest", "parity", "cache", "greedy", "beam4", "staggered1", "staggered4", "fresh"]
)
def test_check_passes(checks: list[Check], name: str) -> None:
    (check,) = [c for c in checks if c.name == name]
    assert check.passed, check.detail


# --- compare_exports: what makes a committed directory stale, and what only gets reported ---------


def fresh_copy(tmp_path: Path) -> Path:
    """The committed default model as if freshly exported (its files only, no derived variants)."""
    fresh = tmp_path / "fresh"
    shutil.copytree(DEFAULT_MODEL_DIR, fresh, ignore=shutil.ignore_patterns("int8", "fp16", "optimized"))
    return fresh


def rewrite(model_dir: Path, graph: str, edit: Callable[[onnx.ModelProto], None]) -> None:
    """Edit a graph file in place and record its new checksum, as an export writing it would."""
    model = onnx.load(model_dir / graph, load_external_data=False)
    edit(model)
    onnx.save(model, model_dir / graph)
    edit_manifest(model_dir, lambda m: m["files"].__setitem__(graph, sha256_file(model_dir / graph)))


def edit_manifest(model_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = model_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    edit(manifest)
    path.write_text(json.dumps(manifest), encoding="utf-8")


def test_other_tool_versions_are_reported_not_failed(tmp_path: Path) -> None:
    fresh = fresh_copy(tmp_path)
    committed = json.loads((DEFAULT_MODEL_DIR / MANIFEST_FILE).read_text(encoding="utf-8"))["exporter"]
    edit_manifest(fresh, lambda m: m["exporter"].update(onnxruntime="9.9.9", onnx="8.8.8"))
    rewrite(fresh, "decoder_step.onnx", lambda m: setattr(m, "producer_version", "7.7.7"))
    comparison = compare_exports(DEFAULT_MODEL_DIR, fresh)
    assert comparison.differences == []
    assert comparison.notes == [
        "decoder_step.onnx: the same graph, written by another producer version",
        f"exported with other tools (recorded, not compared): onnx {committed['onnx']} → 8.8.8, "
        f"onnxruntime {committed['onnxruntime']} → 9.9.9",
    ]


def _change_inline_initializer(model: onnx.ModelProto) -> None:
    tensor = next(
        t
        for t in model.graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL and t.data_type == onnx.TensorProto.FLOAT
    )
    values = onnx.numpy_helper.to_array(tensor).copy()
    values.flat[0] += 1.0
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))


def _change_weight_reference(model: onnx.ModelProto) -> None:
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    offset = next(entry for entry in tensor.external_data if entry.key == "offset")
    offset.value = str(int(offset.value) + 4)  # the same file, another slice of it


def _change_node(model: onnx.ModelProto) -> None:
    node = next(n for n in model.graph.node if n.op_type == "Add")
    node.op_type = "Sub"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_change_inline_initializer, "encoder.onnx changed initializers"),
        (_change_weight_reference, "encoder.onnx changed initializers"),
        (_change_node, "encoder.onnx changed nodes"),
    ],
)
def test_a_changed_graph_fails(
    tmp_path: Path, edit: Callable[[onnx.ModelProto], None], expected: str
) -> None:
    fresh = fresh_copy(tmp_path)
    rewrite(fresh, "encoder.onnx", edit)
    graph, checksum = compare_exports(DEFAULT_MODEL_DIR, fresh).differences
    assert graph.startswith(expected), graph
    assert checksum == "manifest.json: files[encoder.onnx]"


def test_a_changed_checksum_or_contract_fails(tmp_path: Path) -> None:
    fresh = fresh_copy(tmp_path)
    edit_manifest(fresh, lambda m: m["files"].__setitem__("model.safetensors", "0" * 64))
    edit_manifest(fresh, lambda m: m["limits"].__setitem__("max_source_tokens", 1))
    comparison = compare_exports(DEFAULT_MODEL_DIR, fresh)
    assert comparison.differences == ["manifest.json: files[model.safetensors]", "manifest.json: limits"]
