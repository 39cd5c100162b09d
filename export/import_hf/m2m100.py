"""M2M100 and NLLB checkpoints (`model_type: m2m_100`): their config, their tokenizer, languages.

Pre-LayerNorm with a final LayerNorm after each stack, ReLU, sinusoids in fairseq's layout counted
from pad_id + 1, embeddings scaled by √d_model, decoding from the end token with the target
language's token forced first. NLLB's tokenizer is a `tokenizers` file (tokenizer.json) whose
language codes are special tokens; the importer names them in a descriptor (multilingual.json,
service.modeldir.tokenizer's `BpeTokenizer.described`). M2M100's is a SentencePiece model and
vocab.json with its language tokens after the vocabulary (sentencepiece.json, `M2M100Tokenizer`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

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

DESCRIPTOR = "multilingual.json"  # NLLB's: names tokenizer.json and its language tokens
SPM_DESCRIPTOR = "sentencepiece.json"  # M2M100's: its SentencePiece model, vocabulary, languages
_TOKENIZER = "tokenizer.json"
_SPM = "sentencepiece.bpe.model"
_VOCAB = "vocab.json"


def plan(src: Path, config: dict[str, Any], generation: dict[str, Any]) -> ImportPlan:
    tokenizer_config = _read_optional(src / "tokenizer_config.json")
    if (src / _TOKENIZER).is_file():  # NLLB: a tokenizers file
        hf = HFTokenizer.from_file(str(src / _TOKENIZER))
        codes = _language_codes(tokenizer_config, hf)
        languages = {code: int(hf.token_to_id(code) or 0) for code in codes}  # present: _language_codes
        unk = hf.token_to_id("<unk>")
        files, descriptor_name = [_TOKENIZER], DESCRIPTOR
        descriptor: dict[str, Any] = {"tokenizer": _TOKENIZER, "languages": languages}
    elif (src / _SPM).is_file() and (src / _VOCAB).is_file():  # M2M100: SentencePiece + vocab.json
        vocab = read_json(src / _VOCAB)
        codes = _fairseq_codes(str(tokenizer_config.get("language_codes", "m2m100")))
        languages = {code: len(vocab) + i for i, code in enumerate(codes)}  # after the vocabulary
        unk = vocab.get("<unk>")
        files, descriptor_name = [_SPM, _VOCAB], SPM_DESCRIPTOR
        descriptor = {
            "sentencepiece": {"source": _SPM, "target": _SPM, "vocab": _VOCAB, "target_vocab": None},
            "family": "m2m100",
            "languages": languages,
        }
    else:
        raise ImportRefused(f"{src}: missing tokenizer files ({_TOKENIZER}, or {_SPM} and {_VOCAB})")
    if unk is None:
        raise ImportRefused(f"{src}: the tokenizer has no <unk> token")
    cfg = _transformer_config(config, int(unk))
    descriptor["special_ids"] = {"pad": cfg.pad_id, "bos": cfg.bos_id, "eos": cfg.eos_id, "unk": cfg.unk_id}
    default = str(tokenizer_config.get("src_lang") or next(iter(languages)))
    bad = [ids[0] for ids in generation.get("bad_words_ids") or [] if len(ids) == 1]

    def write_tokenizer(out: Path) -> str:
        for name in files:
            shutil.copyfile(src / name, out / name)
        (out / descriptor_name).write_text(json.dumps(descriptor, indent=2) + "\n", encoding="utf-8")
        return descriptor_name

    return ImportPlan(
        cfg=cfg,
        languages=Languages(source=default, target=""),
        write_tokenizer=write_tokenizer,
        decoding=Decoding(
            never_ids=tuple(bad),
            multilingual=True,
            forced_eos_at_limit=forced_eos(config, generation, cfg.eos_id),
            **generation_defaults(config, generation),
        ),
    )


def _read_optional(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def _fairseq_codes(name: str) -> list[str]:
    """M2M100's language codes, in the order their tokens follow the vocabulary (Transformers keeps
    the list; the tokenizer config names which)."""
    try:
        from transformers.models.m2m_100.tokenization_m2m_100 import FAIRSEQ_LANGUAGE_CODES
    except ImportError as err:  # the export extra has it
        raise ImportRefused(f"M2M100's language codes need transformers installed ({err})") from err
    if name not in FAIRSEQ_LANGUAGE_CODES:
        known = ", ".join(sorted(FAIRSEQ_LANGUAGE_CODES))
        raise ImportRefused(f"tokenizer_config.json: language_codes {name!r} is not one of {known}")
    return list(FAIRSEQ_LANGUAGE_CODES[name])


def _language_codes(tokenizer_config: dict[str, Any], hf: HFTokenizer) -> list[str]:
    """The language codes: the tokenizer config's extra special tokens that the vocabulary has."""
    listed = tokenizer_config.get("extra_special_tokens") or tokenizer_config.get("additional_special_tokens")
    codes = [c for c in listed or [] if isinstance(c, str) and hf.token_to_id(c) is not None]
    if not codes:
        raise ImportRefused("tokenizer_config.json lists no language codes (extra_special_tokens)")
    return codes


def _transformer_config(config: dict[str, Any], unk: int) -> TransformerConfig:
    pad = int(required(config, "pad_token_id"))
    try:
        return TransformerConfig(
            vocab_size=int(required(config, "vocab_size")),
            **stack_settings(config, "relu"),
            norm_placement="pre",
            share_embeddings=True,
            tie_output_embeddings=bool(config.get("tie_word_embeddings", True)),
            final_logits_bias=False,
            pad_id=pad,
            bos_id=int(required(config, "decoder_start_token_id")),  # the decoder's start token
            unk_id=unk,
            position_layout="fairseq",
            position_offset=pad + 1,
        )
    except ValueError as err:
        raise ImportRefused(f"config.json: {err}") from err
