"""Turn a checkpoint directory into a served model directory: fp32 graphs + manifest.json.

`export_model_directory` is what `python -m export` (and `make export`) runs. The graphs'
weights point into the checkpoint's own `model.safetensors`; the manifest records the
signature of every graph and the sha256 of every file the server will read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch

from export.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_model
from export.model import TransformerConfig
from export.onnx.contract import graph_specs
from export.onnx.export import EXPORTER_KIND, OPSET, export_graph, verify_graph
from export.onnx.weights import SafetensorsIndex
from service.modeldir.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    Decoding,
    ExporterInfo,
    Languages,
    Limits,
    Manifest,
    checksums,
    write_manifest,
)
from service.modeldir.tokenizer import SpecialIds, Tokenizer

MODEL_CARD_JSON = "model_card.json"
DEFAULT_LANGUAGES = Languages(source="en", target="fr")
# Copied along when exporting into another directory, so that it is a complete checkpoint too.
_CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, MODEL_CARD_JSON, "model_card.md")


def _check_tokenizer(path: Path, cfg: TransformerConfig) -> Tokenizer:
    tokenizer = Tokenizer.from_file(path)
    expected = SpecialIds(pad=cfg.pad_id, bos=cfg.bos_id, eos=cfg.eos_id, unk=cfg.unk_id)
    if tokenizer.special != expected:
        raise ValueError(f"{path}: special ids {tokenizer.special} differ from {CONFIG_FILE}'s {expected}")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{path}: {tokenizer.vocab_size} tokens do not fit the model's vocab_size {cfg.vocab_size}"
        )
    if tokenizer.source_vocab_size > cfg.src_vocab_size:
        raise ValueError(
            f"{path}: {tokenizer.source_vocab_size} source tokens do not fit the model's source "
            f"vocabulary of {cfg.src_vocab_size}"
        )
    return tokenizer


def _quality(model_dir: Path) -> dict[str, Any] | None:
    """The model card's results (`make eval`), or None when the model was not evaluated."""
    path = model_dir / MODEL_CARD_JSON
    if not path.is_file():
        return None
    results = json.loads(path.read_text(encoding="utf-8")).get("results")
    return results if isinstance(results, dict) else None


def export_model_directory(
    model_dir: Path,
    out_dir: Path | None = None,
    *,
    name: str | None = None,
    version: str = "1.0.0",
    languages: Languages = DEFAULT_LANGUAGES,
    tokenizer_file: str = TOKENIZER_FILE,
    decoding: Decoding | None = None,
) -> Manifest:
    """Export the fp32 graphs of the checkpoint in `model_dir` and write `manifest.json`.

    Args:
        model_dir: a checkpoint (config.json, model.safetensors, tokenizer.json).
        out_dir: where to write; default `model_dir` itself. Elsewhere, the checkpoint files are
            copied there first, since the graphs reference the weight file next to them.
        name: model name for the manifest; default the output directory's name.
        version: semantic version of the model.
        languages: source and target language codes.
        tokenizer_file: the tokenizer's file (service.modeldir.tokenizer), with any files it names.
        decoding: an imported checkpoint's decoding record (None: this project's conventions).
    Returns:
        The manifest written.
    """
    out_dir = model_dir if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # A failed export must not leave a manifest that vouches for half-written graphs.
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    if out_dir.resolve() != model_dir.resolve():
        for file in _CHECKPOINT_FILES:
            if (model_dir / file).is_file():
                shutil.copyfile(model_dir / file, out_dir / file)
    model = load_model(out_dir)
    cfg = model.cfg
    tokenizer = _check_tokenizer(out_dir / tokenizer_file, cfg)

    weights = SafetensorsIndex(out_dir / WEIGHTS_FILE)
    specs = graph_specs(cfg)
    for graph_name, spec in specs.items():
        path = export_graph(model, graph_name, spec, out_dir, weights)
        verify_graph(model, graph_name, spec, path)

    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=name or out_dir.resolve().name,
        version=version,
        languages=languages,
        variant="fp32",
        architecture=cfg.to_dict(),
        special_ids=SpecialIds(pad=cfg.pad_id, bos=cfg.bos_id, eos=cfg.eos_id, unk=cfg.unk_id),
        limits=Limits(max_source_tokens=cfg.max_positions, max_target_tokens=cfg.max_positions),
        opset=OPSET,
        tokenizer=tokenizer_file,
        graphs=specs,
        files=checksums(out_dir, [*(s.file for s in specs.values()), WEIGHTS_FILE, *tokenizer.files]),
        quality=_quality(out_dir),
        exporter=ExporterInfo(
            torch=torch.__version__,
            onnx=onnx.__version__,
            onnxruntime=onnxruntime.__version__,
            kind=EXPORTER_KIND,
        ),
        decoding=decoding,
    )
    write_manifest(out_dir, manifest)
    return manifest
