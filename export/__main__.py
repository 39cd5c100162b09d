"""Export a checkpoint to ONNX: `python -m export --model-dir models/en-fr-small [--out DIR]`.

Writes encoder.onnx, decoder_step.onnx, attention.onnx (weights external, in model.safetensors)
and manifest.json — in place by default, next to the weights (docs/model-directory.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from export.onnx.directory import export_model_directory
from service.modeldir.manifest import MANIFEST_FILE, Languages


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="checkpoint directory to export")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: --model-dir)")
    parser.add_argument("--name", default=None, help="model name (default: the output directory's name)")
    parser.add_argument("--version", default="1.0.0", help="semantic version of the model")
    parser.add_argument("--source-language", default="en")
    parser.add_argument("--target-language", default="fr")
    args = parser.parse_args()
    out_dir = args.out or args.model_dir
    manifest = export_model_directory(
        args.model_dir,
        out_dir,
        name=args.name,
        version=args.version,
        languages=Languages(args.source_language, args.target_language),
    )
    for spec in manifest.graphs.values():
        print(f"{out_dir / spec.file}: {(out_dir / spec.file).stat().st_size:,} bytes")
    print(f"{out_dir / MANIFEST_FILE}: {manifest.name} {manifest.version} ({manifest.variant})")


if __name__ == "__main__":
    main()
