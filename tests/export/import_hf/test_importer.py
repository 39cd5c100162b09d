"""Importing a Marian checkpoint: the same ids, the same outputs as Transformers, clear refusals."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MarianMTModel, MarianTokenizer

from export.import_hf.__main__ import main
from export.import_hf.checkpoint import ImportRefused
from export.import_hf.importer import import_checkpoint
from export.variants import VARIANTS, BuildOptions, build_variants
from service.engine.graphs import OnnxGraphs
from service.engine.reference_decoder import translate_ids
from service.modeldir.manifest import load_manifest
from service.modeldir.tokenizer import Tokenizer
from tests.export.import_hf.conftest import KINDS

Imported = Callable[[str], tuple[Path, Path]]  # the `imported` fixture: kind → (checkpoint, import)

MAX_NEW = 24  # output tokens, end token included: well under the tiny model's 128 positions


def _sentences(tiny_corpus: dict[str, list[tuple[str, str]]], count: int = 60) -> list[str]:
    return [en for en, _ in tiny_corpus["test"][:count]]


@pytest.mark.parametrize("kind", ["shared", "separate-vocabs"])
def test_source_ids_and_decoded_text_equal_marian_tokenizer(
    imported: Imported, tiny_corpus: dict[str, list[tuple[str, str]]], kind: str
) -> None:
    checkpoint, model_dir = imported(kind)
    hf = MarianTokenizer.from_pretrained(checkpoint)
    ours = Tokenizer.from_file(model_dir / load_manifest(model_dir).tokenizer)
    texts = [*_sentences(tiny_corpus, 200), "  Spaced   out  ", "Ünïcödé and emoji 😀", ">>fr<< The cat."]
    for text in texts:
        assert ours.encode_source(text, 512) == hf(text)["input_ids"], text
    differ = 0
    for _, french in tiny_corpus["test"][:100]:
        ids = hf(text_target=french)["input_ids"]
        assert [*ours.encode_target(french), ours.special.eos] == ids
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        differ += ours.encode_target(french) != ours.encode(french)
    if kind == "separate-vocabs":  # the target side has ids of its own
        assert hf.separate_vocabs and (ours.source_vocab_size, ours.vocab_size) == (402, 302)
        assert differ == 100
        source = ours.encode("The cat.")
        assert [ours.source_token(i) for i in source] == hf.spm_source.encode("The cat.", out_type=str)
        assert [ours.source_token(i) for i in source] != [ours.id_to_token(i) for i in source]


def test_special_tokens_typed_in_text_stay_text(marian_model_dir: Path) -> None:
    """Unlike Transformers, "</s>" typed by a client is not an end token (as for every model here)."""
    tokenizer = Tokenizer.from_file(marian_model_dir / load_manifest(marian_model_dir).tokenizer)
    ids = tokenizer.encode("a </s> b <pad>")
    assert tokenizer.special.eos not in ids and tokenizer.special.pad not in ids


# Beam 4 of the activation and output-table variants adds little to their greedy run: left to the
# full suite.
KIND_BEAMS = [
    pytest.param(
        kind, beam, marks=pytest.mark.full if beam > 1 and kind in ("relu", "gelu", "untied-output") else ()
    )
    for kind in KINDS
    for beam in (1, 4)
]


@pytest.mark.parametrize(("kind", "beam_size"), KIND_BEAMS)
def test_outputs_equal_transformers_generate(
    imported: Imported, tiny_corpus: dict[str, list[tuple[str, str]]], kind: str, beam_size: int
) -> None:
    checkpoint, model_dir = imported(kind)
    texts = _sentences(tiny_corpus)
    hf_tokenizer = MarianTokenizer.from_pretrained(checkpoint)
    model = MarianMTModel.from_pretrained(checkpoint).eval()
    batch = hf_tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = model.generate(
            **batch,
            num_beams=beam_size,
            max_new_tokens=MAX_NEW,
            do_sample=False,
        )
    pad, eos = model.config.pad_token_id, model.config.eos_token_id
    expected = []
    for row in generated.tolist():
        tokens = [t for t in row[1:] if t != pad]
        expected.append(tokens[:-1] if tokens and tokens[-1] == eos else tokens)

    graphs = OnnxGraphs(model_dir)
    sources = [list(ids) for ids in batch["input_ids"].tolist()]
    sources = [ids[: ids.index(eos) + 1] for ids in sources]
    hyps = translate_ids(graphs, sources, beam_size=beam_size, max_output_tokens=MAX_NEW)
    got = [list(h[0].tokens) for h in hyps]
    assert len({tuple(t) for t in got}) >= 10  # the outputs differ from sentence to sentence
    # the limit ends the others with the checkpoint's forced_eos_token_id; for OPUS-MT's layout
    # (whose raised end logit is tuned for it) some also end on their own before it
    assert all(h[0].finished for h in hyps)
    if kind == "shared":
        assert 0 < sum(len(h[0].tokens) < MAX_NEW - 1 for h in hyps) < len(texts)
    assert got == expected


def test_manifest_records_the_marian_architecture(marian_model_dir: Path) -> None:
    manifest = load_manifest(marian_model_dir)
    assert manifest.architecture["position_layout"] == "marian"
    assert manifest.architecture["activation"] == "swish"
    assert manifest.architecture["final_logits_bias"] is True
    assert manifest.special_ids.bos == manifest.special_ids.pad  # OPUS-MT starts from the pad token
    assert manifest.languages.source == "en" and manifest.languages.target == "fr"
    tokenizer_files = {"sentencepiece.json", "source.spm", "target.spm", "vocab.json"}
    assert tokenizer_files <= set(manifest.files)


def test_every_file_is_readable_by_the_servers_user(marian_model_dir: Path) -> None:
    """safetensors writes model.safetensors 0600; a server running as another user must read it."""
    assert marian_model_dir.stat().st_mode & 0o755 == 0o755
    for file in marian_model_dir.iterdir():
        assert file.stat().st_mode & 0o644 == 0o644, file.name


def test_separate_vocabularies_are_imported_as_two_tables(separate_model_dir: Path) -> None:
    manifest = load_manifest(separate_model_dir)
    architecture = manifest.architecture
    assert (architecture["source_vocab_size"], architecture["vocab_size"]) == (402, 302)
    assert architecture["share_embeddings"] is False and architecture["tie_output_embeddings"] is True
    assert manifest.shape.vocab_size == 302  # what decoding chooses from: the target vocabulary
    assert manifest.graphs["decoder_step"].outputs[0].shape == ("batch", 302)
    assert "target_vocab.json" in manifest.files
    descriptor = json.loads((separate_model_dir / "sentencepiece.json").read_text())
    assert descriptor["sentencepiece"]["target_vocab"] == "target_vocab.json"


@pytest.mark.parametrize("kind", ["shared", "separate-vocabs"])
def test_the_derived_variants_build_and_serve_the_same_tokenizer(
    imported: Imported, tmp_path: Path, kind: str
) -> None:
    model_dir = Path(shutil.copytree(imported(kind)[1], tmp_path / "tiny-marian"))
    options = BuildOptions(sentences=20, parity_sentences=20, corpus_dir=tmp_path / "no-corpus")
    manifests = build_variants(model_dir, VARIANTS, options)
    assert set(manifests) == set(VARIANTS)
    fp32_files = {f for f in load_manifest(model_dir).files if not f.endswith((".onnx", ".safetensors"))}
    assert "vocab.json" in fp32_files and ("target_vocab.json" in fp32_files) == (kind != "shared")
    for name in VARIANTS:
        graphs = OnnxGraphs(model_dir / name)  # checksums verified, the tokenizer files included
        assert fp32_files <= set(graphs.manifest.files)


# --- refusals: one line, exit 1, nothing written ---------------------------------------------------


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "checkpoint"))


def _refused(src: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main([str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("import refused: ")
    assert not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())
    return err


def test_not_a_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _refused(tmp_path / "empty", tmp_path / "out", capsys)
    assert "not a directory" in _refused(tmp_path / "missing", tmp_path / "out", capsys)


def test_an_unsupported_model_type_is_named(
    marian_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _copy(marian_checkpoint, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    assert "model_type 't5' is not supported" in _refused(src, tmp_path / "out", capsys)


def test_a_missing_tokenizer_file_is_named(
    marian_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _copy(marian_checkpoint, tmp_path)
    (src / "target.spm").unlink()
    assert "missing tokenizer file target.spm" in _refused(src, tmp_path / "out", capsys)


def test_weights_that_do_not_match_the_config_are_refused(
    marian_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _copy(marian_checkpoint, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48}))
    assert "fc1.weight has shape (64, 32), the config needs (48, 32)" in _refused(src, tmp_path / "o", capsys)

    src = _copy(marian_checkpoint, tmp_path / "second")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.decoder.layers.1.fc2.bias"]
    save_file(tensors, str(src / "model.safetensors"))
    assert "lack model.decoder.layers.1.fc2.bias" in _refused(src, tmp_path / "o", capsys)


def test_tables_and_vocabularies_that_do_not_fit_the_config_are_refused(
    marian_checkpoint: Path, separate_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _copy(marian_checkpoint, tmp_path / "a")  # one stored table, a config asking for two
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "share_encoder_decoder_embeddings": False}))
    assert "lack model.encoder.embed_tokens.weight" in _refused(src, tmp_path / "o", capsys)

    src = _copy(marian_checkpoint, tmp_path / "b")  # the decoder would read other ids than it predicts
    (src / "config.json").write_text(
        json.dumps({**config, "decoder_vocab_size": 100, "tie_word_embeddings": False})
    )
    assert "decoder_vocab_size 100 differs from vocab_size" in _refused(src, tmp_path / "o", capsys)

    src = _copy(separate_checkpoint, tmp_path / "c")
    (src / "target_vocab.json").unlink()
    assert "missing tokenizer file target_vocab.json" in _refused(src, tmp_path / "o", capsys)

    src = _copy(separate_checkpoint, tmp_path / "d")  # target ids beyond the decoder's table
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "decoder_vocab_size": 300}))
    assert "target_vocab.json: ids up to 301 do not fit decoder_vocab_size 300" in _refused(
        src, tmp_path / "o", capsys
    )


def test_an_existing_output_directory_is_left_alone(marian_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ImportRefused, match="already exists and is not empty"):
        import_checkpoint(marian_checkpoint, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
