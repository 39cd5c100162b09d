"""Model weights as safetensors + a JSON config: no pickle anywhere.

A model directory holds `config.json` (the `TransformerConfig`), `model.safetensors` and
`tokenizer.json`. Tied tensors (shared embeddings, output projection) are stored once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from export.model import Transformer, TransformerConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def _tied_names(cfg: TransformerConfig) -> set[str]:
    """Parameter names that alias another parameter and so are not stored."""
    tied = set()
    if cfg.share_embeddings:
        tied.add("tgt_embed.weight")
    if cfg.tie_output_embeddings:
        tied.add("output_proj.weight")
    return tied


def save_model(model: Transformer, model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    tied = _tied_names(model.cfg)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(model_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (model_dir / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")


def load_config(model_dir: Path) -> TransformerConfig:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing model config")
    try:
        return TransformerConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:  # bad JSON, unknown or missing fields, bad values
        raise ValueError(f"{path}: invalid model config: {err}") from err


def load_model(model_dir: Path, device: str | torch.device = "cpu") -> Transformer:
    """Build the model from `config.json` and load `model.safetensors`, in eval mode."""
    cfg = load_config(model_dir)
    path = model_dir / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing model weights")
    model = Transformer(cfg)
    try:
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    except RuntimeError as err:  # shapes that do not match the config
        raise ValueError(f"{path}: weights do not match {CONFIG_FILE}: {err}") from err
    expected_missing = _tied_names(cfg)
    if set(missing) - expected_missing or unexpected:
        raise ValueError(f"{path}: weights do not match config: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()
