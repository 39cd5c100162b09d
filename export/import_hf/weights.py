"""Hugging Face's BART-family parameter names (Marian, M2M100, NLLB) → `export.model.Transformer`'s.

Both families store q/k/v/out projections, fc1/fc2 and the per-sublayer LayerNorms under the same
names; only which of the shared, per-stack and output tables are stored differs between
checkpoints (tied tables are often stored once), so every table is looked for under each name
a checkpoint may use.
"""

from __future__ import annotations

import torch

from export.import_hf.checkpoint import ImportRefused
from export.model import Transformer

_ATTENTION = {"q_proj": "w_q", "k_proj": "w_k", "v_proj": "w_v", "out_proj": "w_o"}
_ENCODER_LAYER = {
    **{f"self_attn.{hf}": f"self_attn.{ours}" for hf, ours in _ATTENTION.items()},
    "self_attn_layer_norm": "attn_sublayer.norm",
    "fc1": "ffn.w_1",
    "fc2": "ffn.w_2",
    "final_layer_norm": "ffn_sublayer.norm",
}
_DECODER_LAYER = {
    **{f"self_attn.{hf}": f"self_attn.{ours}" for hf, ours in _ATTENTION.items()},
    **{f"encoder_attn.{hf}": f"cross_attn.{ours}" for hf, ours in _ATTENTION.items()},
    "self_attn_layer_norm": "self_sublayer.norm",
    "encoder_attn_layer_norm": "cross_sublayer.norm",
    "fc1": "ffn.w_1",
    "fc2": "ffn.w_2",
    "final_layer_norm": "ffn_sublayer.norm",
}
# Where each embedding table may be stored; the first name present wins. A checkpoint whose encoder
# and decoder have tables of their own has no shared one (a model.shared it holds is not read).
_SHARED = "model.shared.weight"
_TABLES = {
    "src_embed.weight": ("model.encoder.embed_tokens.weight", _SHARED),
    "tgt_embed.weight": ("model.decoder.embed_tokens.weight", _SHARED),
    "output_proj.weight": ("lm_head.weight",),
}
# Derived from the config, never needed from the file (the model computes its own table).
_IGNORED_SUFFIXES = ("embed_positions.weight", "embed_positions._float_tensor")


def hf_names(model: Transformer, shared_table: bool = True) -> dict[str, tuple[str, ...]]:
    """Our parameter name → the checkpoint names it may be stored under; `model.shared` only where
    the checkpoint's config gives the encoder and decoder one table (`shared_table`)."""
    cfg = model.cfg
    names: dict[str, tuple[str, ...]] = {}
    for stack, count, table in (
        ("encoder", cfg.n_encoder_layers, _ENCODER_LAYER),
        ("decoder", cfg.n_decoder_layers, _DECODER_LAYER),
    ):
        for i in range(count):
            for hf, ours in table.items():
                for kind in ("weight", "bias"):
                    names[f"{stack}_layers.{i}.{ours}.{kind}"] = (f"model.{stack}.layers.{i}.{hf}.{kind}",)
    for stack in ("encoder", "decoder"):
        for kind in ("weight", "bias"):
            names[f"{stack}_norm.{kind}"] = (f"model.{stack}.layer_norm.{kind}",)
    names.update({ours: tuple(n for n in hf if shared_table or n != _SHARED) for ours, hf in _TABLES.items()})
    names["logits_bias"] = ("final_logits_bias",)
    return names


def load_hf_weights(model: Transformer, tensors: dict[str, torch.Tensor], shared_table: bool = True) -> None:
    """Fill `model` from a checkpoint's tensors; refuse a missing, misshapen or unused tensor.

    Args:
        shared_table: the checkpoint's config gives the encoder and decoder one table
            (`model.shared`, Marian's share_encoder_decoder_embeddings).
    """
    state = model.state_dict()
    names = hf_names(model, shared_table)
    used: set[str] = set()
    loaded: dict[str, torch.Tensor] = {}
    for ours, target in state.items():
        found = next((n for n in names[ours] if n in tensors), None)
        if found is None:
            if ours in ("tgt_embed.weight", "output_proj.weight") and _tied(model, ours):
                continue  # the same tensor as the source table, filled through it
            raise ImportRefused(f"weights lack {' or '.join(names[ours])} (the model's {ours})")
        tensor = tensors[found].reshape(target.shape) if ours == "logits_bias" else tensors[found]
        if tensor.shape != target.shape:
            raise ImportRefused(
                f"weights: {found} has shape {tuple(tensor.shape)}, the config needs {tuple(target.shape)}"
            )
        loaded[ours] = tensor
        used.add(found)
    unused = sorted(
        n
        for n in tensors
        if n not in used
        and not n.endswith(_IGNORED_SUFFIXES)
        and n not in {m for ns in _TABLES.values() for m in ns}
    )
    if unused:
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        raise ImportRefused(f"weights hold tensors the config does not use: {shown}")
    model.load_state_dict(loaded, strict=False)
    _check_tied(model, tensors)


def _tied(model: Transformer, name: str) -> bool:
    cfg = model.cfg
    return cfg.share_embeddings if name == "tgt_embed.weight" else cfg.tie_output_embeddings


def _check_tied(model: Transformer, tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint that stores tied tables separately must store the same values in each."""
    for ours in ("tgt_embed.weight", "output_proj.weight"):
        if not _tied(model, ours):
            continue
        for name in _TABLES[ours]:
            if name in tensors and not torch.equal(tensors[name], model.state_dict()[ours]):
                raise ImportRefused(f"weights: {name} differs from the table the config ties it to")
