"""MarianMT (OPUS-MT) checkpoints: their config as a `TransformerConfig`, their tokenizer files.

Marian is post-LayerNorm with static sinusoids laid out in halves ("marian"), embeddings scaled
by √d_model, a final logits bias, and decoding that starts from the pad token. Tokenization is
SentencePiece (source.spm, target.spm) looked up in vocab.json (service.modeldir.tokenizer's
`MarianTokenizer`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from export.import_hf.checkpoint import ImportRefused, forced_eos, read_json
from export.import_hf.family import ImportPlan
from export.model_config import Activation, TransformerConfig
from service.modeldir.manifest import Decoding, Languages

TOKENIZER_DESCRIPTOR = "sentencepiece.json"
_SPM_FILES = ("source.spm", "target.spm")
_VOCAB = "vocab.json"
_ACTIVATIONS: dict[str, Activation] = {"swish": "swish", "silu": "swish", "gelu": "gelu", "relu": "relu"}


def _same(config: dict[str, Any], first: str, second: str) -> Any:
    if config.get(first) != config.get(second):
        raise ImportRefused(
            f"config.json: {first} {config.get(first)} differs from {second} {config.get(second)}; "
            "the encoder and decoder must share it"
        )
    return config[first]


def _required(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise ImportRefused(f"config.json: {key} is missing")
    return config[key]


def transformer_config(config: dict[str, Any], vocab: dict[str, int]) -> TransformerConfig:
    """The `TransformerConfig` of a Marian config.json (refusing what the model cannot hold)."""
    if config.get("separate_vocabs") or not config.get("share_encoder_decoder_embeddings", True):
        raise ImportRefused(
            "config.json: separate source and target vocabularies (share_encoder_decoder_embeddings "
            "false) are not supported yet"
        )
    vocab_size = int(_required(config, "vocab_size"))
    if config.get("decoder_vocab_size", vocab_size) != vocab_size:
        raise ImportRefused(
            f"config.json: decoder_vocab_size {config['decoder_vocab_size']} differs from vocab_size "
            f"{vocab_size}; separate vocabularies are not supported yet"
        )
    activation = str(config.get("activation_function", "swish"))
    if activation not in _ACTIVATIONS:
        raise ImportRefused(
            f"config.json: activation_function {activation!r} is not supported (swish, silu, gelu, relu)"
        )
    if "<unk>" not in vocab:
        raise ImportRefused(f"{_VOCAB}: has no <unk> token")
    pad = int(_required(config, "pad_token_id"))
    try:
        return TransformerConfig(
            vocab_size=vocab_size,
            d_model=int(_required(config, "d_model")),
            n_heads=int(_same(config, "encoder_attention_heads", "decoder_attention_heads")),
            n_encoder_layers=int(_required(config, "encoder_layers")),
            n_decoder_layers=int(_required(config, "decoder_layers")),
            d_ff=int(_same(config, "encoder_ffn_dim", "decoder_ffn_dim")),
            activation=_ACTIVATIONS[activation],
            norm_placement="post",
            scale_embeddings=bool(config.get("scale_embedding", False)),
            share_embeddings=True,
            tie_output_embeddings=bool(config.get("tie_word_embeddings", True)),
            final_logits_bias=True,
            max_positions=int(_required(config, "max_position_embeddings")),
            dropout=0.0,
            pad_id=pad,
            bos_id=int(config.get("decoder_start_token_id", pad)),  # the decoder's start token
            eos_id=int(_required(config, "eos_token_id")),
            unk_id=int(vocab["<unk>"]),
            position_layout="marian",
        )
    except ValueError as err:
        raise ImportRefused(f"config.json: {err}") from err


def plan(src: Path, config: dict[str, Any], generation: dict[str, Any]) -> ImportPlan:
    """Marian's decoding needs no record: OPUS-MT never generates its pad token (its bad_words_ids),
    which is also its start token, as this project's default (pad and start never generated)."""
    vocab = read_vocab(src)
    cfg = transformer_config(config, vocab)
    decoding = None
    if forced_eos(config, generation, cfg.eos_id):
        decoding = Decoding(never_ids=(cfg.pad_id, cfg.bos_id), forced_eos_at_limit=True)
    return ImportPlan(cfg, _languages(src), lambda out: write_tokenizer(src, out, cfg), decoding)


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


def read_vocab(src: Path) -> dict[str, int]:
    for name in (*_SPM_FILES, _VOCAB):
        if not (src / name).is_file():
            raise ImportRefused(f"{src}: missing tokenizer file {name}")
    vocab = read_json(src / _VOCAB)
    if not all(isinstance(v, int) for v in vocab.values()):
        raise ImportRefused(f"{src / _VOCAB}: not a token → id map")
    return vocab


def write_tokenizer(src: Path, out: Path, cfg: TransformerConfig) -> str:
    """Copy the SentencePiece models and vocabulary and write their descriptor; → its file name."""
    for name in (*_SPM_FILES, _VOCAB):
        shutil.copyfile(src / name, out / name)
    descriptor = {
        "sentencepiece": {
            "source": "source.spm",
            "target": "target.spm",
            "vocab": _VOCAB,
            "target_vocab": None,
        },
        "special_ids": {"pad": cfg.pad_id, "bos": cfg.bos_id, "eos": cfg.eos_id, "unk": cfg.unk_id},
    }
    (out / TOKENIZER_DESCRIPTOR).write_text(json.dumps(descriptor, indent=2) + "\n", encoding="utf-8")
    return TOKENIZER_DESCRIPTOR
