"""Checkpoint directory → model directory: pick the family, map config and weights, export.

Everything is written into a scratch directory beside the output and moved into place only once
the export (graphs verified against the PyTorch model, manifest with checksums) is complete, so a
refused or failed import leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export.checkpoint import save_model
from export.import_hf import m2m100, marian
from export.import_hf.checkpoint import ImportRefused, read_config, read_generation_config, read_weights
from export.import_hf.family import ImportPlan
from export.import_hf.weights import load_hf_weights
from export.model import Transformer
from export.onnx.directory import export_model_directory
from service.modeldir.manifest import Languages, Manifest

FAMILIES: dict[str, Callable[[Path, dict[str, Any], dict[str, Any]], ImportPlan]] = {
    "marian": marian.plan,  # MarianMT, OPUS-MT
    "m2m_100": m2m100.plan,  # NLLB (tokenizer.json)
}


def import_checkpoint(
    src: Path,
    out: Path,
    *,
    name: str | None = None,
    version: str = "1.0.0",
    languages: Languages | None = None,
) -> Manifest:
    """Import the checkpoint in `src` into the new model directory `out`.

    Args:
        name: the served model's name; default `out`'s directory name.
        languages: source and target codes; default the family's (a bilingual tokenizer config's
            source_lang/target_lang; a multilingual model's default source language).
    Raises:
        ImportRefused: naming what is wrong with `src`, or `out` already holding files.
    """
    config = read_config(src)
    model_type = config["model_type"]
    if model_type not in FAMILIES:
        raise ImportRefused(f"{src}: model_type {model_type!r} is not supported ({', '.join(FAMILIES)})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImportRefused(f"{out}: already exists and is not empty")
    plan = FAMILIES[model_type](src, config, read_generation_config(src))
    model = Transformer(plan.cfg).eval()
    load_hf_weights(model, read_weights(src), shared_table=plan.shared_table)

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model(model, scratch)
        manifest = export_model_directory(
            scratch,
            name=name or out.resolve().name,
            version=version,
            languages=languages or plan.languages,
            tokenizer_file=plan.write_tokenizer(scratch),
            decoding=plan.decoding,
        )
        # mkdtemp's 0700, and safetensors' 0600 for model.safetensors, would hide the model from
        # the server's user
        scratch.chmod(0o755)
        for file in scratch.iterdir():
            if file.is_file():
                file.chmod(0o644)
        if out.exists():
            out.rmdir()  # empty, checked above
        scratch.rename(out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return manifest
