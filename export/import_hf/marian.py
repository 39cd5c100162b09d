"""MarianMT (OPUS-MT) checkpoints: their config as a `TransformerConfig`, their tokenizer files.

Marian is post-LayerNorm with static sinusoids laid out in halves ("marian"), embeddings scaled
by √d_model, a final logits bias, and decoding that starts from the pad token. Tokenization is
SentencePiece (source.spm, target.spm) looked up in vocab.json, or, where the tokenizer config says
`separate_vocabs`, source pieces in vocab.json and target pieces in target_vocab.json
(service.modeldir.tokenizer's `MarianTokenizer`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.import_hf.checkpoint import (
    ImportRefused,
    forced_eos,
    generation_defaults,
    read_json,
    required,
    stack_settings,
)
from export.import_hf.family import ImportPlan
from export.model_config import TransformerConfig
from service.modeldir.manifest import Decoding, Languages

TOKENIZER_DESCRIPTOR = "sentencepiece.json"
_SPM_FILES = ("source.spm", "target.spm")
_VOCAB = "vocab.json"
_TARGET_VOCAB = "target_vocab.json"  # separate vocabularies: the target side's
_TOKENIZER_CONFIG = "tokenizer_config.json"


def transformer_config(config: dict[str, Any], vocabs: Vocabularies) -> TransformerConfig:
    """The `TransformerConfig` of a Marian config.json (refusing what the model cannot hold).

    The embedding tables are Transformers' MarianMTModel's: one table (`vocab_size` rows) for the
    encoder, the decoder and the output projection when `share_encoder_decoder_embeddings` and
    `tie_word_embeddings` hold (OPUS-MT's usual case); without sharing, the encoder's table has
    `vocab_size` rows and the decoder's and the output projection's `decoder_vocab_size`; without
    tying, each is a table of its own, the output projection stored as `lm_head`.
    """
    shared = shares_a_table(config)
    tied = bool(config.get("tie_word_embeddings", True))
    vocab_size = int(required(config, "vocab_size"))
    decoder_vocab_size = int(config.get("decoder_vocab_size") or vocab_size)
    if shared:
        # Tied, the decoder's table is the shared one and decoder_vocab_size sizes nothing; untied,
        # Transformers gives the decoder its own decoder_vocab_size rows but predicts vocab_size ids
        if not tied and decoder_vocab_size != vocab_size:
            raise ImportRefused(
                f"config.json: decoder_vocab_size {decoder_vocab_size} differs from vocab_size {vocab_size} "
                "with share_encoder_decoder_embeddings and untied output embeddings: the decoder would "
                "read other ids than it predicts"
            )
        source_size = target_size = vocab_size
    else:
        source_size, target_size = vocab_size, decoder_vocab_size
    for name, vocab, size, key in (
        (_VOCAB, vocabs.source, source_size, "vocab_size"),
        (
            vocabs.target_file or _VOCAB,
            vocabs.target_ids,
            target_size,
            "vocab_size" if shared else "decoder_vocab_size",
        ),
    ):
        if max(vocab.values()) >= size:  # ids the embedding table has no row for
            raise ImportRefused(f"{name}: ids up to {max(vocab.values())} do not fit {key} {size}")
    pad = int(required(config, "pad_token_id"))
    try:
        return TransformerConfig(
            vocab_size=target_size,
            **stack_settings(config, "swish"),
            norm_placement="post",
            share_embeddings=shared and tied,
            tie_output_embeddings=tied,
            final_logits_bias=True,
            pad_id=pad,
            bos_id=int(config.get("decoder_start_token_id", pad)),  # the decoder's start token
            unk_id=int(vocabs.source["<unk>"]),
            position_layout="marian",
            source_vocab_size=None if source_size == target_size else source_size,
        )
    except ValueError as err:
        raise ImportRefused(f"config.json: {err}") from err


def plan(src: Path, config: dict[str, Any], generation: dict[str, Any]) -> ImportPlan:
    """OPUS-MT never generates its pad token (its bad_words_ids), which is also its start token, as
    this project's default; the decoding record says so, whether it forces its end token, and its
    generation defaults."""
    vocabs = read_vocabs(src)
    cfg = transformer_config(config, vocabs)
    defaults = generation_defaults(config, generation)
    decoding = None
    if defaults or forced_eos(config, generation, cfg.eos_id):
        decoding = Decoding(
            never_ids=(cfg.pad_id, cfg.bos_id),
            forced_eos_at_limit=forced_eos(config, generation, cfg.eos_id),
            **defaults,
        )
    return ImportPlan(
        cfg,
        _languages(src),
        lambda out: write_tokenizer(src, out, cfg, vocabs),
        decoding,
        shared_table=shares_a_table(config),
    )


def _languages(src: Path) -> Languages:
    path = src / _TOKENIZER_CONFIG
    config = read_json(path) if path.is_file() else {}
    source, target = config.get("source_lang"), config.get("target_lang")
    if not (isinstance(source, str) and isinstance(target, str)):
        raise ImportRefused(
            f"{src}: the tokenizer config names no source_lang/target_lang; "
            "give --source-language and --target-language"
        )
    return Languages(source=source, target=target)


def shares_a_table(config: dict[str, Any]) -> bool:
    """Whether the checkpoint's encoder and decoder read one table (`model.shared`), as stored."""
    return bool(config.get("share_encoder_decoder_embeddings", True))


@dataclass(frozen=True)
class Vocabularies:
    """vocab.json, and target_vocab.json where the tokenizer config says `separate_vocabs`."""

    source: dict[str, int]
    target: dict[str, int] | None

    @property
    def target_file(self) -> str | None:
        return _TARGET_VOCAB if self.target is not None else None

    @property
    def target_ids(self) -> dict[str, int]:
        """The vocabulary target ids come from: target_vocab.json, else the shared vocab.json."""
        return self.source if self.target is None else self.target


def _vocab(path: Path) -> dict[str, int]:
    vocab = read_json(path)
    if not all(isinstance(v, int) and v >= 0 for v in vocab.values()):
        raise ImportRefused(f"{path}: not a token → id map")
    if "<unk>" not in vocab:
        raise ImportRefused(f"{path}: has no <unk> token")
    return vocab


def read_vocabs(src: Path) -> Vocabularies:
    """The vocabularies Transformers' MarianTokenizer.from_pretrained reads from `src`."""
    tokenizer_config = src / _TOKENIZER_CONFIG
    separate = tokenizer_config.is_file() and bool(read_json(tokenizer_config).get("separate_vocabs"))
    for name in (*_SPM_FILES, _VOCAB, *([_TARGET_VOCAB] if separate else [])):
        if not (src / name).is_file():
            raise ImportRefused(f"{src}: missing tokenizer file {name}")
    vocabs = Vocabularies(_vocab(src / _VOCAB), _vocab(src / _TARGET_VOCAB) if separate else None)
    if vocabs.target_ids["<unk>"] != vocabs.source["<unk>"]:
        raise ImportRefused(
            f"{src / _TARGET_VOCAB}: <unk> is {vocabs.target_ids['<unk>']}, "
            f"not {vocabs.source['<unk>']} as in {_VOCAB}"
        )
    return vocabs


def write_tokenizer(src: Path, out: Path, cfg: TransformerConfig, vocabs: Vocabularies) -> str:
    """Copy the SentencePiece models and vocabularies and write their descriptor; → its file name."""
    for name in (*_SPM_FILES, _VOCAB, *([vocabs.target_file] if vocabs.target_file else [])):
        shutil.copyfile(src / name, out / name)
    descriptor = {
        "sentencepiece": {
            "source": "source.spm",
            "target": "target.spm",
            "vocab": _VOCAB,
            "target_vocab": vocabs.target_file,
        },
        "special_ids": {"pad": cfg.pad_id, "bos": cfg.bos_id, "eos": cfg.eos_id, "unk": cfg.unk_id},
    }
    (out / TOKENIZER_DESCRIPTOR).write_text(json.dumps(descriptor, indent=2) + "\n", encoding="utf-8")
    return TOKENIZER_DESCRIPTOR
