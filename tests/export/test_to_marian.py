"""export.to_marian: the default model written out as a MarianMT checkpoint computes the same model.

Teacher-forced logits within 1e-4 of ours, greedy outputs token for token those of the reference
decoder over the ONNX graphs, and the checkpoint imported back (export.import_hf's Marian mapping)
decoding as the original does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, MarianMTModel

from export.checkpoint import TOKENIZER_FILE, load_model
from export.corpus import CorpusConfig, generate_corpus
from export.generate import greedy_decode
from export.import_hf.checkpoint import read_config, read_weights
from export.import_hf.marian import Vocabularies, transformer_config
from export.import_hf.weights import load_hf_weights
from export.model import Transformer, sinusoidal_positions
from export.to_marian import ExportRefused, export_marian, marian_permutation, to_marian
from service.engine.graphs import OnnxGraphs
from service.engine.reference_decoder import translate_ids
from service.modeldir.tokenizer import Tokenizer

DEFAULT_MODEL = Path("models/en-fr-small")
SENTENCES = 120
MAX_NEW = 64  # more than any of these sentences needs: every output ends with the end token
SMALL = CorpusConfig(train_size=10, valid_size=10, test_size=SENTENCES, heldout_size=10)


@pytest.fixture(scope="module")
def ours() -> Transformer:
    torch.set_num_threads(2)
    return load_model(DEFAULT_MODEL).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("marian") / "en-fr-small"
    export_marian(DEFAULT_MODEL, out)
    return out


@pytest.fixture(scope="module")
def marian(checkpoint: Path) -> MarianMTModel:
    return MarianMTModel.from_pretrained(checkpoint, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def sentences() -> tuple[list[list[int]], list[list[int]]]:
    """(source ids ending with the end token, target ids starting with the start token) of test pairs."""
    tokenizer = Tokenizer.from_file(DEFAULT_MODEL / TOKENIZER_FILE)
    pairs = generate_corpus(SMALL)["test"]
    sources = [tokenizer.encode_source(pair.en, 128) for pair in pairs]
    targets = [[tokenizer.special.bos, *tokenizer.encode_target(pair.fr)] for pair in pairs]
    return sources, targets


def _padded(rows: list[list[int]]) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (longest - len(r)) for r in rows])


def _marian_greedy(marian: MarianMTModel, sources: list[list[int]], eos: int) -> list[tuple[int, ...]]:
    src = _padded(sources)
    with torch.no_grad():
        out = marian.generate(
            input_ids=src, attention_mask=(src != 0).long(), max_new_tokens=MAX_NEW, forced_eos_token_id=None
        )
    hyps = []
    for row in out.tolist():
        row = row[1:]  # the start token
        hyps.append(tuple(row[: row.index(eos)] if eos in row else row))
    return hyps


def test_the_checkpoint_says_how_it_decodes(checkpoint: Path, ours: Transformer) -> None:
    cfg = ours.cfg
    config = json.loads((checkpoint / "config.json").read_text())
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    assert (config["model_type"], config["activation_function"], config["scale_embedding"]) == (
        "marian",
        "relu",
        True,
    )
    assert (config["pad_token_id"], config["decoder_start_token_id"], config["eos_token_id"]) == (
        cfg.pad_id,
        cfg.bos_id,
        cfg.eos_id,
    )
    assert generation["bad_words_ids"] == [[cfg.pad_id], [cfg.bos_id]]
    assert generation.get("forced_eos_token_id") is None and "max_length" not in generation
    assert (checkpoint / TOKENIZER_FILE).read_bytes() == (DEFAULT_MODEL / TOKENIZER_FILE).read_bytes()
    # AutoTokenizer reads it (peers' converters look up the vocabulary so); it adds no end token
    text, ours_tokenizer = "I drink water.", Tokenizer.from_file(DEFAULT_MODEL / TOKENIZER_FILE)
    assert AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"] == ours_tokenizer.encode(text)


def test_marian_positions_are_ours_permuted(ours: Transformer, marian: MarianMTModel) -> None:
    # Marian's table is computed in float64 and rounded, ours in float32: the same up to rounding
    perm = marian_permutation(ours.cfg)
    table = marian.model.encoder.embed_positions.weight
    assert torch.allclose(ours.positions[:, perm], table, atol=1e-5, rtol=0)
    assert torch.equal(sinusoidal_positions(ours.cfg.max_positions, ours.cfg.d_model, "marian"), table)


def test_teacher_forced_logits_equal_ours(
    ours: Transformer, marian: MarianMTModel, sentences: tuple[list[list[int]], list[list[int]]]
) -> None:
    src, tgt = (_padded(rows) for rows in sentences)
    with torch.no_grad():
        expected = ours(src, tgt)
        got = marian(input_ids=src, attention_mask=(src != 0).long(), decoder_input_ids=tgt).logits
    real = tgt != 0  # right padding: a real position never attends to a padded one
    assert (got - expected).abs()[real].max().item() < 1e-4


def test_greedy_outputs_equal_the_reference_decoder(
    ours: Transformer, marian: MarianMTModel, sentences: tuple[list[list[int]], list[list[int]]]
) -> None:
    sources, _ = sentences
    reference = [h[0] for h in translate_ids(OnnxGraphs(DEFAULT_MODEL), sources, max_output_tokens=MAX_NEW)]
    assert all(h.finished for h in reference)
    got = _marian_greedy(marian, sources, ours.cfg.eos_id)
    mismatches = [i for i, (g, r) in enumerate(zip(got, reference, strict=True)) if g != r.tokens]
    assert not mismatches, f"{len(mismatches)} of {len(sources)} differ, first {mismatches[:5]}"


def test_imported_back_it_decodes_as_the_original(
    checkpoint: Path, ours: Transformer, sentences: tuple[list[list[int]], list[list[int]]]
) -> None:
    # export.import_hf's command refuses the directory (a Marian import reads SentencePiece files,
    # this model's tokenizer is a tokenizers file): its Marian config and weight mapping, directly
    vocab = Tokenizer.from_file(checkpoint / TOKENIZER_FILE)
    ids = {vocab.id_to_token(i): i for i in range(vocab.vocab_size)}
    cfg = transformer_config(read_config(checkpoint), Vocabularies(ids, None))
    assert cfg.position_layout == "marian" and cfg.bos_id == ours.cfg.bos_id
    imported = Transformer(cfg).eval()
    load_hf_weights(imported, read_weights(checkpoint))
    src = _padded(sentences[0])
    with torch.no_grad():
        expected, got = (greedy_decode(m, src, MAX_NEW) for m in (ours, imported))
    assert [h.tokens for h in got] == [h.tokens for h in expected]


def test_refuses_what_marian_cannot_compute(tiny_model: Callable[..., Transformer]) -> None:
    with pytest.raises(ExportRefused, match="norm placement"):
        to_marian(tiny_model(norm_placement="pre"))
    with pytest.raises(ExportRefused, match="position layout"):
        to_marian(tiny_model(position_layout="fairseq"))


def test_refuses_a_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    with pytest.raises(ExportRefused, match="not empty"):
        export_marian(DEFAULT_MODEL, tmp_path)
