"""Checkpoint directory → model directory: pick the family, map config and weights, export.

Everything is written into a scratch directory beside the output and moved into place only once
the export (graphs verified against the PyTorch model, manifest with checksums) is complete, so a
refused or failed import leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from export.checkpoint import save_model
from export.import_hf import marian
from export.import_hf.checkpoint import ImportRefused, read_config, read_json, read_weights
from export.import_hf.weights import load_hf_weights
from export.model import Transformer
from export.onnx.directory import export_model_directory
from service.modeldir.manifest import Languages, Manifest

SUPPORTED = ("marian",)


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
        languages: source and target codes; default the tokenizer config's source_lang/target_lang.
    Raises:
        ImportRefused: naming what is wrong with `src`, or `out` already holding files.
    """
    config = read_config(src)
    model_type = config["model_type"]
    if model_type not in SUPPORTED:
        raise ImportRefused(f"{src}: model_type {model_type!r} is not supported ({', '.join(SUPPORTED)})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImportRefused(f"{out}: already exists and is not empty")
    vocabs = marian.read_vocabs(src)
    cfg = marian.transformer_config(config, vocabs)
    model = Transformer(cfg).eval()
    load_hf_weights(model, read_weights(src), shared_table=marian.shares_a_table(config))
    languages = languages or _languages(src)

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model(model, scratch)
        tokenizer_file = marian.write_tokenizer(src, scratch, cfg, vocabs)
        manifest = export_model_directory(
            scratch,
            name=name or out.resolve().name,
            version=version,
            languages=languages,
            tokenizer_file=tokenizer_file,
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


def _languages(src: Path) -> Languages:
    path = src / "tokenizer_config.json"
    config = read_json(path) if path.is_file() else {}
    source, target = config.get("source_lang"), config.get("target_lang")
    if not (isinstance(source, str) and isinstance(target, str)):
        raise ImportRefused(
            f"{src}: the tokenizer config names no source_lang/target_lang; "
            "give --source-language and --target-language"
        )
    return Languages(source=source, target=target)
