"""Importing an NLLB (M2M100-architecture) checkpoint: languages as tokens, outputs as Transformers'."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import M2M100ForConditionalGeneration, M2M100Tokenizer, NllbTokenizer

from export.import_hf.checkpoint import ImportRefused
from export.import_hf.importer import import_checkpoint
from service.engine.graphs import OnnxGraphs
from service.engine.reference_decoder import translate_ids
from service.modeldir.manifest import load_manifest
from service.modeldir.tokenizer import Tokenizer
from tests.export.import_hf.tiny_checkpoints import NLLB_LANGUAGES

MAX_NEW = 24


def _tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(model_dir / load_manifest(model_dir).tokenizer)


def test_the_manifest_records_a_multilingual_model(nllb_model_dir: Path) -> None:
    manifest = load_manifest(nllb_model_dir)
    assert manifest.architecture["norm_placement"] == "pre"
    assert manifest.architecture["position_layout"] == "fairseq"
    assert manifest.architecture["position_offset"] == manifest.special_ids.pad + 1
    assert manifest.special_ids.bos == manifest.special_ids.eos  # NLLB decodes from its end token
    assert manifest.decoding is not None and manifest.decoding.multilingual
    assert manifest.never_ids == ()  # Transformers bans nothing: neither may we
    assert (manifest.languages.source, manifest.languages.target) == ("eng_Latn", "")
    assert list(_tokenizer(nllb_model_dir).languages) == list(NLLB_LANGUAGES)


@pytest.mark.parametrize("language", ["eng_Latn", "fra_Latn"])
def test_source_ids_equal_nllb_tokenizer(
    nllb_checkpoint: Path, nllb_model_dir: Path, tiny_corpus: dict[str, list[tuple[str, str]]], language: str
) -> None:
    hf = NllbTokenizer.from_pretrained(nllb_checkpoint, src_lang=language)
    ours = _tokenizer(nllb_model_dir)
    for pair in tiny_corpus["test"][:100]:
        for text in pair:
            assert ours.encode_source(text, 512, language) == hf(text)["input_ids"], text
            ids = hf(text)["input_ids"]
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def _generate(checkpoint: Path, texts: list[str], targets: list[str], beams: int) -> list[list[int]]:
    """Transformers' outputs, one call per target language, as generated token ids (the language
    token first, no start or end token)."""
    tokenizer = NllbTokenizer.from_pretrained(checkpoint, src_lang="eng_Latn")
    model = M2M100ForConditionalGeneration.from_pretrained(checkpoint).eval()
    out: dict[int, list[int]] = {}
    for language in dict.fromkeys(targets):
        rows = [i for i, t in enumerate(targets) if t == language]
        batch = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True)
        with torch.no_grad():
            generated = model.generate(
                **batch,
                num_beams=beams,
                max_new_tokens=MAX_NEW,
                do_sample=False,
                forced_bos_token_id=tokenizer.convert_tokens_to_ids(language),
            )
        for i, row in zip(rows, generated.tolist(), strict=True):
            tokens = [t for t in row[1:] if t != model.config.pad_token_id]
            out[i] = tokens[:-1] if tokens and tokens[-1] == model.config.eos_token_id else tokens
    return [out[i] for i in range(len(texts))]


@pytest.mark.parametrize("beams", [1, 4])
def test_a_mixed_batch_of_target_languages_equals_transformers(
    nllb_checkpoint: Path, nllb_model_dir: Path, tiny_corpus: dict[str, list[tuple[str, str]]], beams: int
) -> None:
    texts = [en for en, _ in tiny_corpus["test"][:60]]
    targets = [NLLB_LANGUAGES[1 + i % 2] for i in range(len(texts))]  # French and German, mixed
    tokenizer = _tokenizer(nllb_model_dir)
    sources = [tokenizer.encode_source(t, 128, "eng_Latn") for t in texts]
    starts = [[tokenizer.languages[t]] for t in targets]
    graphs = OnnxGraphs(nllb_model_dir)
    hyps = translate_ids(graphs, sources, beam_size=beams, max_output_tokens=MAX_NEW, forced_starts=starts)
    got = [list(h[0].tokens) for h in hyps]
    assert len({tuple(t) for t in got}) > len(texts) // 2
    assert got == _generate(nllb_checkpoint, texts, targets, beams)


def test_missing_tokenizer_files_are_refused_by_name(nllb_checkpoint: Path, tmp_path: Path) -> None:
    src = Path(shutil.copytree(nllb_checkpoint, tmp_path / "checkpoint"))
    (src / "tokenizer.json").unlink()
    with pytest.raises(ImportRefused, match=r"missing tokenizer files \(tokenizer.json, or sentencepiece"):
        import_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- M2M100: the same architecture, its own SentencePiece tokenizer ---------------------------------


def test_m2m100_source_ids_equal_its_tokenizer(
    m2m100_checkpoint: Path, m2m100_model_dir: Path, tiny_corpus: dict[str, list[tuple[str, str]]]
) -> None:
    ours = _tokenizer(m2m100_model_dir)
    assert len(ours.languages) == 100 and "fr" in ours.languages
    for language in ("en", "fr"):
        hf = M2M100Tokenizer.from_pretrained(m2m100_checkpoint, src_lang=language)
        assert ours.languages["fr"] == hf.get_lang_id("fr")
        for pair in tiny_corpus["test"][:100]:
            for text in pair:
                ids = hf(text)["input_ids"]
                assert ours.encode_source(text, 512, language) == ids, text
                # a tokenizer built here lists no language token as special, so Transformers would
                # print "__en__"; ours drops language tokens as every multilingual model should
                assert ours.decode(ids) == hf.decode(ids[1:], skip_special_tokens=True)


@pytest.mark.parametrize("beams", [1, 4])
def test_m2m100_outputs_equal_transformers(
    m2m100_checkpoint: Path, m2m100_model_dir: Path, tiny_corpus: dict[str, list[tuple[str, str]]], beams: int
) -> None:
    texts = [en for en, _ in tiny_corpus["test"][:50]]
    tokenizer = _tokenizer(m2m100_model_dir)
    hf = M2M100Tokenizer.from_pretrained(m2m100_checkpoint, src_lang="en")
    model = M2M100ForConditionalGeneration.from_pretrained(m2m100_checkpoint).eval()
    batch = hf(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = model.generate(
            **batch,
            num_beams=beams,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            forced_bos_token_id=hf.get_lang_id("fr"),
        )
    expected = []
    for row in generated.tolist():
        tokens = [t for t in row[1:] if t != model.config.pad_token_id]
        expected.append(tokens[:-1] if tokens and tokens[-1] == model.config.eos_token_id else tokens)
    sources = [tokenizer.encode_source(t, 128, "en") for t in texts]
    starts = [[tokenizer.languages["fr"]]] * len(texts)
    hyps = translate_ids(
        OnnxGraphs(m2m100_model_dir),
        sources,
        beam_size=beams,
        max_output_tokens=MAX_NEW,
        forced_starts=starts,
    )
    got = [list(h[0].tokens) for h in hyps]
    assert len({tuple(t) for t in got}) > len(texts) // 2
    assert got == expected
