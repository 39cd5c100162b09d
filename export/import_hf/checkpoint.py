"""Reading a Hugging Face checkpoint directory: its config, generation defaults and weights.

Every refusal is an `ImportRefused` whose message names what is wrong, in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from export.model_config import Activation

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class ImportRefused(ValueError):
    """The directory cannot be imported; the message says why."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ImportRefused(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise ImportRefused(f"{path}: not a JSON object")
    return data


def read_config(src: Path) -> dict[str, Any]:
    """config.json, checked to be a checkpoint's config (it names a `model_type`)."""
    if not src.is_dir():
        raise ImportRefused(f"{src}: not a directory")
    path = src / CONFIG
    if not path.is_file():
        raise ImportRefused(f"{src}: not a Hugging Face checkpoint (no {CONFIG})")
    config = read_json(path)
    if "model_type" not in config:
        raise ImportRefused(f"{path}: names no model_type")
    return config


def read_generation_config(src: Path) -> dict[str, Any]:
    """generation_config.json, or {} when the checkpoint ships none."""
    path = src / GENERATION_CONFIG
    return read_json(path) if path.is_file() else {}


def forced_eos(config: dict[str, Any], generation: dict[str, Any], eos_id: int) -> bool:
    """Whether the checkpoint forces its end token at the length limit (forced_eos_token_id)."""
    forced = generation.get("forced_eos_token_id", config.get("forced_eos_token_id"))
    return forced == eos_id or (isinstance(forced, list) and eos_id in forced)


def generation_defaults(config: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """The decoding record's defaults from what the checkpoint ships: num_beams, and max_length
    (which counts the decoder's start token) as the most output tokens; only what it sets."""

    def setting(key: str) -> Any:
        return generation.get(key, config.get(key))

    defaults: dict[str, Any] = {}
    if isinstance(setting("num_beams"), int) and setting("num_beams") > 1:
        defaults["default_beam_size"] = setting("num_beams")
    if isinstance(setting("max_length"), int) and setting("max_length") > 1:
        defaults["max_output_tokens"] = setting("max_length") - 1
    return defaults


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor, as float32 where it is floating point."""
    for name in WEIGHT_FILES:
        path = src / name
        if path.is_file():
            break
    else:
        raise ImportRefused(f"{src}: no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
        else:  # tensors only: weights_only refuses pickled code
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, not a traceback
        raise ImportRefused(f"{path}: unreadable weights ({type(err).__name__}: {err})") from err
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def required(config: dict[str, Any], key: str) -> Any:
    """config.json's `key`, refused when missing."""
    if config.get(key) is None:
        raise ImportRefused(f"config.json: {key} is missing")
    return config[key]


def alike(config: dict[str, Any], encoder_key: str, decoder_key: str) -> Any:
    """A setting the encoder and the decoder must have alike (this model has one for both)."""
    if config.get(encoder_key) != config.get(decoder_key):
        raise ImportRefused(
            f"config.json: {encoder_key} {config.get(encoder_key)} differs from {decoder_key} "
            f"{config.get(decoder_key)}; the encoder and decoder must share it"
        )
    return config[encoder_key]


_ACTIVATIONS: dict[str, Activation] = {"swish": "swish", "silu": "swish", "gelu": "gelu", "relu": "relu"}


def activation(config: dict[str, Any], default: str) -> Activation:
    """config.json's activation_function, as `TransformerConfig` names it."""
    name = str(config.get("activation_function", default))
    if name not in _ACTIVATIONS:
        raise ImportRefused(
            f"config.json: activation_function {name!r} is not supported ({', '.join(_ACTIVATIONS)})"
        )
    return _ACTIVATIONS[name]


def stack_settings(config: dict[str, Any], default_activation: str) -> dict[str, Any]:
    """The TransformerConfig fields every BART-family config.json gives alike: widths, depths,
    heads, activation, embedding scale, positions, eos (dropout off: the import is for inference)."""
    return {
        "d_model": int(required(config, "d_model")),
        "n_heads": int(alike(config, "encoder_attention_heads", "decoder_attention_heads")),
        "n_encoder_layers": int(required(config, "encoder_layers")),
        "n_decoder_layers": int(required(config, "decoder_layers")),
        "d_ff": int(alike(config, "encoder_ffn_dim", "decoder_ffn_dim")),
        "activation": activation(config, default_activation),
        "scale_embeddings": bool(config.get("scale_embedding", False)),
        "max_positions": int(required(config, "max_position_embeddings")),
        "dropout": 0.0,
        "eos_id": int(required(config, "eos_token_id")),
    }
