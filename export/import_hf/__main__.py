"""`python -m export.import_hf SRC_DIR --out MODEL_DIR`: import a local Hugging Face checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.import_hf.checkpoint import ImportRefused
from export.import_hf.importer import import_checkpoint
from service.modeldir.manifest import MANIFEST_FILE, Languages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.import_hf", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="the checkpoint directory (config.json, weights, tokenizer)")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write (new or empty)")
    parser.add_argument("--name", default=None, help="the served model's name (default: --out's name)")
    parser.add_argument("--version", default="1.0.0", help="semantic version of the model")
    parser.add_argument("--source-language", default=None, help="default: the tokenizer config's")
    parser.add_argument("--target-language", default=None, help="default: the tokenizer config's")
    args = parser.parse_args(argv)
    if (args.source_language is None) != (args.target_language is None):
        parser.error("give both --source-language and --target-language, or neither")
    languages = Languages(args.source_language, args.target_language) if args.source_language else None
    try:
        manifest = import_checkpoint(
            args.src, args.out, name=args.name, version=args.version, languages=languages
        )
    except ImportRefused as err:
        print(f"import refused: {err}", file=sys.stderr)
        return 1
    print(f"{args.out / MANIFEST_FILE}: {manifest.name} {manifest.version} ({manifest.variant})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
