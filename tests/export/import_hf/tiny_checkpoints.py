"""Tiny Hugging Face checkpoints built here, never downloaded: what the importer's tests import.

SentencePiece models are trained on a small slice of the project's own corpus; the weights are
random (seeded), drawn wider than Transformers' default so that greedy and beam outputs vary from
sentence to sentence instead of repeating one token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from transformers import MarianConfig, MarianMTModel, MarianTokenizer

from export.corpus import CorpusConfig, generate_corpus

CORPUS = CorpusConfig(seed=11, train_size=4000, valid_size=50, test_size=200, heldout_size=50)
PIECES = 400  # per SentencePiece model
GENERATION_BEAMS, GENERATION_MAX_LENGTH = 4, 16  # the tiny Marian's generation defaults
EOS_BIAS = 4.0  # about one output in six ends before the tests' limit of 24 tokens


def corpus() -> dict[str, list[tuple[str, str]]]:
    return {name: [(p.en, p.fr) for p in pairs] for name, pairs in generate_corpus(CORPUS).items()}


def _train_spm(texts: list[str], prefix: Path, pieces: int = PIECES, model_type: str = "unigram") -> Path:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(prefix),
        vocab_size=pieces,
        model_type=model_type,
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def _pieces(model_file: Path) -> list[str]:
    model = spm.SentencePieceProcessor(model_file=str(model_file))
    return [model.id_to_piece(i) for i in range(model.get_piece_size())]


def _write_vocab(path: Path, specials: dict[str, int], *piece_lists: list[str]) -> dict[str, int]:
    vocab = dict(specials)
    for pieces in piece_lists:
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
    path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return vocab


def build_marian(
    out: Path,
    pairs: list[tuple[str, str]],
    seed: int = 0,
    eos_bias: float = EOS_BIAS,
    separate_vocabs: bool = False,
    **config: Any,
) -> Path:
    """A MarianMT checkpoint in `out`: source.spm, target.spm, random weights, the end token's logit
    raised by `eos_bias` so that outputs end at varied lengths, and
    - one vocab.json of both models' pieces, `<pad>` last, one embedding table (OPUS-MT's usual
      layout); or, with `separate_vocabs`,
    - vocab.json of the source pieces and target_vocab.json of the target ones (a smaller
      SentencePiece model, so that the sizes differ), `</s>` `<unk>` `<pad>` first in both, and
      the encoder's and the decoder's tables of their own (share_encoder_decoder_embeddings false).
    `config` overrides MarianConfig's settings (activation_function, tie_word_embeddings, ...)."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"source": PIECES, "target": PIECES * 3 // 4 if separate_vocabs else PIECES}
    for side, texts in (("source", [en for en, _ in pairs]), ("target", [fr for _, fr in pairs])):
        _train_spm(texts, out / side, sizes[side]).rename(out / f"{side}.spm")
        (out / f"{side}.vocab").unlink()
    source_pieces, target_pieces = _pieces(out / "source.spm"), _pieces(out / "target.spm")
    extra: dict[str, Any] = {}
    if separate_vocabs:
        specials = {"</s>": 0, "<unk>": 1, "<pad>": 2}
        vocab = _write_vocab(out / "vocab.json", specials, source_pieces)
        target_vocab = _write_vocab(out / "target_vocab.json", specials, target_pieces)
        extra = {"target_vocab_file": str(out / "target_vocab.json"), "separate_vocabs": True}
        sizes = {"vocab_size": len(vocab), "decoder_vocab_size": len(target_vocab)}
        extra_config: dict[str, Any] = {"share_encoder_decoder_embeddings": False}
    else:
        vocab = _write_vocab(out / "vocab.json", {"</s>": 0, "<unk>": 1}, source_pieces, target_pieces)
        vocab["<pad>"] = len(vocab)
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        sizes = {"vocab_size": len(vocab), "decoder_vocab_size": len(vocab)}
        extra_config = {}
    tokenizer = MarianTokenizer(
        source_spm=str(out / "source.spm"),
        target_spm=str(out / "target.spm"),
        vocab=str(out / "vocab.json"),
        source_lang="en",
        target_lang="fr",
        **extra,
    )
    settings = {
        **sizes,
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "max_position_embeddings": 128,
        "pad_token_id": vocab["<pad>"],
        "eos_token_id": 0,
        "decoder_start_token_id": vocab["<pad>"],
        "activation_function": "swish",
        "scale_embedding": True,
        "init_std": 0.3,
        **extra_config,
        **config,
    }
    torch.manual_seed(seed)
    model = MarianMTModel(MarianConfig(**settings)).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.5)
        model.final_logits_bias[0, settings["eos_token_id"]] += eos_bias
    # as OPUS-MT checkpoints ship them (whose max_length is 512: here short, to be reached)
    model.generation_config.bad_words_ids = [[vocab["<pad>"]]]
    model.generation_config.num_beams = GENERATION_BEAMS
    model.generation_config.max_length = GENERATION_MAX_LENGTH
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


NLLB_LANGUAGES = ("eng_Latn", "fra_Latn", "deu_Latn")


def _m2m100_config(vocab_size: int, **config: Any) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "max_position_embeddings": 128,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "activation_function": "relu",
        "scale_embedding": True,
        "init_std": 0.3,
        **config,
    }


def _save_m2m100(out: Path, settings: dict[str, Any], seed: int) -> None:
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    torch.manual_seed(seed)
    M2M100ForConditionalGeneration(M2M100Config(**settings)).eval().save_pretrained(out)


def build_m2m100(out: Path, pairs: list[tuple[str, str]], seed: int = 0, **config: Any) -> Path:
    """An M2M100 checkpoint in `out`: a BPE SentencePiece model and vocab.json over both sides of
    `pairs`, M2M100's 100 language tokens after the vocabulary, random weights."""
    from transformers import M2M100Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    _train_spm([text for pair in pairs for text in pair], out / "spm", model_type="bpe")
    model = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(model.get_piece_size()):
        vocab.setdefault(model.id_to_piece(i), len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = M2M100Tokenizer(
        vocab_file=str(out / "vocab.json"), spm_file=str(out / "spm.model"), src_lang="en"
    )
    (out / "spm.model").unlink()
    (out / "spm.vocab").unlink()
    (out / "vocab.json").unlink()
    tokenizer.save_pretrained(out)
    # the vocabulary, then the language tokens, then fairseq's made-up words
    size = max(tokenizer.lang_code_to_id.values()) + 1 + tokenizer.num_madeup_words
    _save_m2m100(out, _m2m100_config(size, **config), seed)
    return out


def build_nllb(out: Path, pairs: list[tuple[str, str]], seed: int = 0, **config: Any) -> Path:
    """An NLLB checkpoint in `out` (M2M100 architecture): a BPE tokenizer.json trained on both
    sides of `pairs`, three language codes, random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import NllbTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=PIECES * 2, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.train_from_iterator([text for pair in pairs for text in pair], trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = NllbTokenizer(
        vocab=bpe.get_vocab(),
        merges=merges,
        extra_special_tokens=list(NLLB_LANGUAGES),
        src_lang="eng_Latn",
        tgt_lang="fra_Latn",
    )
    _save_m2m100(out, _m2m100_config(len(tokenizer), **config), seed)
    tokenizer.save_pretrained(out)
    return out
