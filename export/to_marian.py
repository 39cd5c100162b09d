"""`python -m export.to_marian --model-dir DIR --out OUT`: a model as a MarianMT checkpoint.

The reverse of export.import_hf for this project's own models, so that peers that read Hugging Face
checkpoints (CTranslate2's converter, Transformers itself) can run the very same model. Lossless:
this project's sinusoids are interleaved (sin at even, cos at odd dimensions), Marian's are laid
out in halves (sines in [0, D/2), cosines in [D/2, D)) with the same angle for pair i, so the two
differ by a fixed permutation P of the model dimension (our 2i → i, 2i+1 → D/2 + i). Permuting
every tensor that indexes the residual stream by P gives a Marian model computing the same
function: the embedding tables' columns (the tied output projection with them), the input columns
of every projection that reads the stream (q/k/v, fc1), the output rows and biases of every one
that writes it (out_proj, fc2), the LayerNorms' weights and biases; attention heads and the
feed-forward network's inner width are untouched, and so are the logits.

OUT holds config.json, model.safetensors and generation_config.json (Transformers'), and this
model's tokenizer.json copied as it is: a byte-level BPE `tokenizers` file that no Marian tokenizer
reads, so a tokenizer_config.json beside it has AutoTokenizer load it as a plain fast tokenizer
(which CTranslate2's converter needs for the vocabulary). That tokenizer adds no end token: peers
are fed token ids, the source ids ending with the end token as service.modeldir.tokenizer's
`encode_source` makes them. The generation config never generates the pad or the start token
(bad_words_ids), as this project's decoders never do, forces no end token, and sets no max_length:
this project's limit is per sentence (service.decoding's `default_max_output_tokens`), so callers
pass max_new_tokens. CTranslate2's stock Marian loader assumes OPUS-MT's conventions that this model
does not share: it drops the embedding table's last row (OPUS-MT's appended <pad>) and starts the
decoder from a zero vector rather than the start token's embedding.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import GenerationConfig, MarianConfig, MarianMTModel, PreTrainedTokenizerFast

from export.checkpoint import TOKENIZER_FILE, load_config, load_model
from export.import_hf.weights import hf_names
from export.model import Transformer
from export.model_config import TransformerConfig
from service.modeldir.tokenizer import Tokenizer

MARIAN_LAYER_NORM_EPS = 1e-5  # Transformers' Marian layers use nn.LayerNorm's default

# Our parameter names by how they index the residual stream (D): the last dimension (the inputs of a
# projection reading it, embedding tables), the first (outputs of one writing it, LayerNorms), none.
_READS_STREAM = (
    "src_embed.weight",
    "tgt_embed.weight",
    "output_proj.weight",
    ".w_q.weight",
    ".w_k.weight",
    ".w_v.weight",
    ".ffn.w_1.weight",
)
_WRITES_STREAM = (
    ".w_o.weight",
    ".w_o.bias",
    ".ffn.w_2.weight",
    ".ffn.w_2.bias",
    ".norm.weight",
    ".norm.bias",
)
_INSIDE = (".w_q.bias", ".w_k.bias", ".w_v.bias", ".ffn.w_1.bias", "logits_bias")
# Transformers' tensors derived from the config, not filled from ours (the model computes them)
_DERIVED = ("embed_positions.weight",)


class ExportRefused(ValueError):
    """The model cannot be written as a MarianMT checkpoint; the message says why."""


def marian_permutation(cfg: TransformerConfig) -> torch.Tensor:
    """Marian's dimension j ← our dimension perm[j]: the even dimensions (sines), then the odd ones
    (cosines); the identity for a model already in Marian's layout."""
    if cfg.position_layout == "marian":
        return torch.arange(cfg.d_model)
    return torch.cat([torch.arange(0, cfg.d_model, 2), torch.arange(1, cfg.d_model, 2)])


def permuted(name: str, tensor: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Our tensor `name` with its residual-stream dimension put in Marian's order."""
    if name.endswith(_READS_STREAM):
        return tensor.index_select(-1, perm)
    if name.endswith(_WRITES_STREAM):
        return tensor.index_select(0, perm)
    if name.endswith(_INSIDE):
        return tensor
    raise ExportRefused(f"the model's {name} is not a tensor a Marian checkpoint holds")


def marian_config(cfg: TransformerConfig) -> MarianConfig:
    """The MarianConfig of a model (refusing what Transformers' Marian cannot compute)."""
    refusals = [
        (cfg.norm_placement != "post", f"norm placement {cfg.norm_placement!r} (Marian is post-norm)"),
        (
            cfg.position_layout not in ("interleaved", "marian") or cfg.position_offset != 0,
            f"position layout {cfg.position_layout!r} from {cfg.position_offset} (Marian's are "
            "sinusoids from 0, a permutation of the interleaved ones)",
        ),
        (
            cfg.layer_norm_eps != MARIAN_LAYER_NORM_EPS,
            f"layer_norm_eps {cfg.layer_norm_eps} (Marian's is {MARIAN_LAYER_NORM_EPS})",
        ),
        (not cfg.share_embeddings, "separate source and target embeddings (not written yet)"),
    ]
    for refused, what in refusals:
        if refused:
            raise ExportRefused(f"cannot write a Marian checkpoint of a model with {what}")
    return MarianConfig(
        vocab_size=cfg.vocab_size,
        decoder_vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        encoder_layers=cfg.n_encoder_layers,
        decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        activation_function=cfg.activation,
        max_position_embeddings=cfg.max_positions,
        scale_embedding=cfg.scale_embeddings,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=cfg.pad_id,
        eos_token_id=cfg.eos_id,
        decoder_start_token_id=cfg.bos_id,
        forced_eos_token_id=None,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=cfg.tie_output_embeddings,
    )


def generation_config(cfg: TransformerConfig) -> GenerationConfig:
    """Greedy from the start token, never generating pad or the start token, no forced end."""
    never = [[cfg.pad_id], [cfg.bos_id]] if cfg.pad_id != cfg.bos_id else [[cfg.pad_id]]
    return GenerationConfig(
        decoder_start_token_id=cfg.bos_id,
        pad_token_id=cfg.pad_id,
        eos_token_id=cfg.eos_id,
        bad_words_ids=never,
        forced_eos_token_id=None,
        num_beams=1,
    )


def special_tokens(tokenizer_file: Path, cfg: TransformerConfig) -> dict[str, str]:
    """The special tokens by Transformers' names, looked up in the tokenizer by the model's ids."""
    tokenizer = Tokenizer.from_file(tokenizer_file)
    ids = {"pad_token": cfg.pad_id, "bos_token": cfg.bos_id, "eos_token": cfg.eos_id, "unk_token": cfg.unk_id}
    return {name: tokenizer.id_to_token(token_id) for name, token_id in ids.items()}


def to_marian(model: Transformer) -> MarianMTModel:
    """The MarianMT model computing the same logits as `model`."""
    cfg = model.cfg
    marian = MarianMTModel(marian_config(cfg)).eval()
    state = marian.state_dict()
    names = hf_names(model, shared_table=True)
    perm = marian_permutation(cfg)
    filled: set[str] = set()
    for ours, tensor in model.state_dict().items():
        value = permuted(ours, tensor.detach().float(), perm)
        for name in (n for n in names[ours] if n in state):
            state[name] = value.reshape(state[name].shape)
            filled.add(name)
    unfilled = sorted(n for n in state if n not in filled and not n.endswith(_DERIVED))
    if "final_logits_bias" in unfilled:  # a model without one: Marian's stays at zero
        state["final_logits_bias"].zero_()
        unfilled.remove("final_logits_bias")
    if unfilled:
        raise ExportRefused(f"the model has no tensor for Marian's {', '.join(unfilled)}")
    marian.load_state_dict(state)
    marian.generation_config = generation_config(cfg)
    return marian


def export_marian(model_dir: Path, out: Path) -> MarianMTModel:
    """Write the model in `model_dir` as a MarianMT checkpoint into `out` (new or empty)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportRefused(f"{out}: already exists and is not empty")
    marian = to_marian(load_model(model_dir).eval())
    out.mkdir(parents=True, exist_ok=True)
    marian.save_pretrained(out)
    tokenizer_file = model_dir / TOKENIZER_FILE
    PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        model_max_length=marian.config.max_position_embeddings,
        **special_tokens(tokenizer_file, load_config(model_dir)),
    ).save_pretrained(out)
    # its tokenizer_config.json is what AutoTokenizer needs; tokenizer.json itself stays as it was
    shutil.copyfile(model_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    for file in out.iterdir():  # safetensors writes 0600, which would hide it from other users
        file.chmod(0o644)
    return marian


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.to_marian", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="the model directory to write out")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint directory (new or empty)")
    args = parser.parse_args(argv)
    try:
        export_marian(args.model_dir, args.out)
    except ExportRefused as err:
        print(f"export refused: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: a MarianMT checkpoint of {args.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
