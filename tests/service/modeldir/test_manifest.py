"""manifest.json: written by the exporter, verified by the loader, refused when anything is off."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from export.onnx.directory import export_model_directory
from service.modeldir.manifest import (
    MANIFEST_FILE,
    Decoding,
    ModelDirectoryError,
    ModelShape,
    TensorSpec,
    check_graph,
    from_dict,
    load_manifest,
    to_json,
    write_manifest,
)
from tests.export.test_onnx_export import VOCAB, write_tiny_checkpoint

CARD_RESULTS = {"greedy": {"test": {"bleu": 42.0, "chrf": 60.5}}}


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[..., Any]) -> Path:
    model_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("model"), tiny_model(vocab_size=VOCAB))
    (model_dir / "model_card.json").write_text(json.dumps({"results": CARD_RESULTS, "weights_bytes": 1}))
    export_model_directory(model_dir, name="tiny-en-fr", version="1.2.3")
    return model_dir


@pytest.fixture
def model_dir(exported_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the exported directory, free to break."""
    return Path(shutil.copytree(exported_dir, tmp_path / "model"))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _edit_manifest(model_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = model_dir / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_loads_what_the_exporter_wrote(exported_dir: Path) -> None:
    manifest = load_manifest(exported_dir)
    assert (manifest.name, manifest.version, manifest.variant) == ("tiny-en-fr", "1.2.3", "fp32")
    assert (manifest.languages.source, manifest.languages.target) == ("en", "fr")
    assert manifest.special_ids.pad == 0 and manifest.special_ids.eos == 2
    assert manifest.limits.max_source_tokens == manifest.architecture["max_positions"]
    assert manifest.quality == CARD_RESULTS  # the model card's results, copied
    assert manifest.exporter.kind == "torchscript"
    assert sorted(manifest.files) == [
        "attention.onnx",
        "decoder_step.onnx",
        "encoder.onnx",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert manifest.format_version == 2
    step = manifest.graphs["decoder_step"]
    layers = range(manifest.architecture["n_decoder_layers"])
    assert [t.name for t in step.inputs] == [
        "tokens",
        "positions",
        "self_mask",
        "src_mask",
        *(f"past_{kv}_{layer}" for layer in layers for kv in "kv"),
        *(f"cross_{kv}_{layer}" for layer in layers for kv in "kv"),
    ]
    assert step.inputs[2].shape == ("batch", "cache_len")
    assert [t.name for t in step.outputs] == ["log_probs", "new_k", "new_v"]
    # Reading and writing back gives the same bytes: the JSON is deterministic.
    assert to_json(manifest) == (exported_dir / MANIFEST_FILE).read_text()


def test_the_decoding_record_is_absent_for_own_models_and_round_trips(exported_dir: Path) -> None:
    manifest = load_manifest(exported_dir)
    assert manifest.decoding is None and "decoding" not in (exported_dir / MANIFEST_FILE).read_text()
    assert manifest.never_ids == (manifest.special_ids.pad, manifest.special_ids.bos)
    imported = dataclasses.replace(manifest, decoding=Decoding(never_ids=(), multilingual=True))
    again = from_dict(json.loads(to_json(imported)))
    assert again.decoding == Decoding(never_ids=(), multilingual=True) and again.never_ids == ()
    with pytest.raises(TypeError, match=r"decoding\.never_ids"):
        from_dict({**json.loads(to_json(imported)), "decoding": {"never_ids": ["x"]}})


def test_shape_types_the_architecture_and_keeps_it_whole(exported_dir: Path) -> None:
    manifest = load_manifest(exported_dir)
    arch = manifest.architecture
    assert manifest.shape == ModelShape(
        d_model=arch["d_model"],
        heads=arch["n_heads"],
        encoder_layers=arch["n_encoder_layers"],
        decoder_layers=arch["n_decoder_layers"],
        vocab_size=arch["vocab_size"],
        max_positions=arch["max_positions"],
    )
    assert manifest.shape.head_dim == arch["d_model"] // arch["n_heads"]
    assert {"d_ff", "activation", "norm_placement"} <= set(arch)  # the fields the server does not read


def test_graphs_match_their_specs(exported_dir: Path) -> None:
    for spec in load_manifest(exported_dir).graphs.values():
        check_graph(spec, _session(exported_dir / spec.file))


def test_refuses_a_missing_manifest(model_dir: Path) -> None:
    (model_dir / MANIFEST_FILE).unlink()
    with pytest.raises(ModelDirectoryError, match=r"manifest\.json: missing manifest"):
        load_manifest(model_dir)


@pytest.mark.parametrize("file", ["model.safetensors", "decoder_step.onnx", "tokenizer.json"])
def test_refuses_a_tampered_file(model_dir: Path, file: str) -> None:
    data = bytearray((model_dir / file).read_bytes())
    data[-1] ^= 1
    (model_dir / file).write_bytes(bytes(data))
    with pytest.raises(ModelDirectoryError, match=rf"{file}: checksum mismatch.*stale or tampered"):
        load_manifest(model_dir)


def test_refuses_a_missing_file(model_dir: Path) -> None:
    (model_dir / "encoder.onnx").unlink()
    with pytest.raises(ModelDirectoryError, match=r"encoder\.onnx: missing"):
        load_manifest(model_dir)


def test_refuses_an_unsupported_format_version(model_dir: Path) -> None:
    _edit_manifest(model_dir, lambda d: d.update(format_version=3))
    with pytest.raises(ModelDirectoryError, match=r"manifest\.json: unsupported format_version 3"):
        load_manifest(model_dir)


def test_refuses_a_directory_exported_for_the_old_decoder_step(model_dir: Path) -> None:
    _edit_manifest(model_dir, lambda d: d.update(format_version=1))
    with pytest.raises(
        ModelDirectoryError, match=r"manifest\.json: format_version 1 .*old decoder-step"
    ) as err:
        load_manifest(model_dir)
    assert "re-export" in str(err.value)


def test_refuses_a_graph_without_checksum(model_dir: Path) -> None:
    _edit_manifest(model_dir, lambda d: d["files"].pop("attention.onnx"))
    with pytest.raises(ModelDirectoryError, match=r"manifest\.json: attention\.onnx has no checksum"):
        load_manifest(model_dir)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda d: d.update(version="v1"), "not a semantic version"),
        (lambda d: d.update(variant="bf16"), "variant 'bf16'"),
        (lambda d: d.pop("limits"), "missing field 'limits'"),
        (lambda d: d.update(opset="18"), "field 'opset' must be int"),
        (lambda d: d["files"].update({"../secret": "0" * 64}), "not a relative path inside"),
        (lambda d: d["graphs"]["encoder"]["inputs"][0].update(dtype="complex"), "unknown dtype"),
        (lambda d: d["special_ids"].update(eos="2"), "field 'eos' must be int"),
        (lambda d: d["languages"].pop("target"), "field 'languages'"),
        (lambda d: d["architecture"].pop("n_heads"), "missing field 'architecture.n_heads'"),
        (lambda d: d["architecture"].update(d_model=16.0), "field 'architecture.d_model' must be int"),
        (lambda d: d["architecture"].update(vocab_size=0), "'architecture.vocab_size' must be positive"),
        (lambda d: d["architecture"].update(n_heads=7), "d_model 16 is not divisible by n_heads 7"),
    ],
)
def test_refuses_a_malformed_manifest(model_dir: Path, edit: Callable[[dict], None], problem: str) -> None:
    _edit_manifest(model_dir, edit)
    with pytest.raises(ModelDirectoryError, match=r"manifest\.json: malformed manifest") as err:
        load_manifest(model_dir)
    assert problem in str(err.value)


def test_write_refuses_an_unreadable_manifest(exported_dir: Path, tmp_path: Path) -> None:
    manifest = dataclasses.replace(load_manifest(exported_dir), version="latest")
    with pytest.raises(ValueError, match="semantic version"):
        write_manifest(tmp_path, manifest)
    assert not (tmp_path / MANIFEST_FILE).exists()


def _replace_tensor(tensors: tuple[TensorSpec, ...], which: str, **changes: Any) -> tuple[TensorSpec, ...]:
    return tuple(dataclasses.replace(t, **changes) if t.name == which else t for t in tensors)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"dtype": "int64"}, "input 'src_mask' is tensor(bool), the manifest says tensor(int64)"),
        ({"shape": ("batch",)}, "input 'src_mask' has rank 2, the manifest says 1"),
        ({"name": "source_mask"}, "missing ['source_mask'], unexpected ['src_mask']"),
    ],
)
def test_check_graph_refuses_a_mismatched_input(
    exported_dir: Path, change: dict[str, Any], problem: str
) -> None:
    spec = load_manifest(exported_dir).graphs["encoder"]
    session = _session(exported_dir / spec.file)
    bad = dataclasses.replace(spec, inputs=_replace_tensor(spec.inputs, "src_mask", **change))
    with pytest.raises(ModelDirectoryError, match=r"^encoder\.onnx: ") as err:
        check_graph(bad, session)
    assert problem in str(err.value)


def test_check_graph_refuses_another_graph(exported_dir: Path) -> None:
    manifest = load_manifest(exported_dir)
    encoder = _session(exported_dir / "encoder.onnx")
    with pytest.raises(ModelDirectoryError, match=r"^decoder_step\.onnx: graph inputs"):
        check_graph(manifest.graphs["decoder_step"], encoder)


def test_check_graph_refuses_a_different_fixed_size(exported_dir: Path) -> None:
    manifest = load_manifest(exported_dir)
    spec = manifest.graphs["encoder"]
    memory = dataclasses.replace(spec.outputs[0], shape=("batch", "src_len", 7))
    bad = dataclasses.replace(spec, outputs=(memory, *spec.outputs[1:]))
    d_model = manifest.architecture["d_model"]
    with pytest.raises(ModelDirectoryError) as err:
        check_graph(bad, _session(exported_dir / spec.file))
    assert str(err.value).endswith(f"output 'memory' has size {d_model} on axis 2, the manifest says 7")
