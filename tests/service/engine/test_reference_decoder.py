"""service.engine.reference_decoder end to end: tiny models exported with the real exporter, decoded by
onnxruntime, checked against the PyTorch reference (export.generate) token for token.

Two models: a random one with a logit bias on the end token (hypotheses end at varied steps) and
one trained for a couple of seconds to reverse its input.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from export.checkpoint import TOKENIZER_FILE, save_model
from export.generate import beam_search, greedy_decode
from export.model import Transformer
from export.onnx.directory import export_model_directory
from service.decoding import (
    Hypothesis,
)
from service.engine.graphs import OnnxGraphs
from service.engine.reference_decoder import (
    translate_ids,
    translate_ids_staggered,
    translate_ids_without_cache,
    translate_texts,
)
from service.modeldir.manifest import ModelDirectoryError
from service.modeldir.tokenizer import InputTooLongError, Tokenizer
from tests.export.test_generate import reverse_task_batch

PAD, BOS, EOS = 0, 1, 2
VOCAB = 20
MAX_OUT = 10
SOURCES = [[5, 9, 11, 2], [7, 8, 12, 13, 14, 15, 2], [19, 4, 2], [6, 6, 17, 10, 18, 2], [16, 10, 2]]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """These tiny models run faster on one thread, and much faster when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def word_level_tokenizer(path: Path) -> None:
    """A tokenizer.json whose ids are the model's: the specials, then words "w4" … "w19"."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {**{t: i for i, t in enumerate(specials)}, **{f"w{i}": i for i in range(4, VOCAB)}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(specials)
    hf.save(str(path))


def train_to_reverse(model: Transformer) -> Transformer:
    """~150 Adam steps on the reversal task (a couple of seconds), as tests/export/test_generate.py."""
    model.train()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(150):
        src, tgt_in, tgt_out = reverse_task_batch(generator, 64, 6)
        loss = F.cross_entropy(model(src, tgt_in).reshape(-1, VOCAB), tgt_out.reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module", params=["random", "trained"])
def exported(request, tiny_model, tmp_path_factory) -> tuple[Transformer, OnnxGraphs]:
    """(the PyTorch model, its graphs exported by `export.onnx.directory` and loaded back)."""
    if request.param == "random":
        model = tiny_model(seed=3, vocab_size=VOCAB, final_logits_bias=True)
        with torch.no_grad():
            model.logits_bias[EOS] = 2.0
    else:
        small = {"d_model": 32, "d_ff": 64, "n_encoder_layers": 1, "n_decoder_layers": 1}
        model = train_to_reverse(tiny_model(seed=0, vocab_size=VOCAB, **small))
    return model, export(model, tmp_path_factory.mktemp(request.param))


def export(model: Transformer, model_dir: Path) -> OnnxGraphs:
    """Checkpoint → model directory (the real exporter, manifest included) → graphs."""
    save_model(model, model_dir)
    word_level_tokenizer(model_dir / TOKENIZER_FILE)
    export_model_directory(model_dir)
    return OnnxGraphs(model_dir, intra_op_threads=1)


def padded(sources: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max(len(s) for s in sources)
    return torch.tensor([[*s] + [PAD] * (width - len(s)) for s in sources])


def assert_same(got: Sequence[Hypothesis], want: Sequence, abs_tol: float = 1e-4) -> None:
    """Token-identical hypotheses (either dataclass) with scores within abs_tol."""
    assert [(tuple(h.tokens), h.finished) for h in got] == [(tuple(h.tokens), h.finished) for h in want]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=abs_tol)


# --- against the PyTorch reference ---------------------------------------------------------------


def test_greedy_matches_export_generate(exported) -> None:
    model, graphs = exported
    got = translate_ids(graphs, SOURCES, max_output_tokens=MAX_OUT)
    want = greedy_decode(model, padded(SOURCES), MAX_OUT)
    for hyps, reference in zip(got, want, strict=True):
        assert len(hyps) == 1
        assert_same(hyps, [reference])


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_matches_export_generate(exported, length_penalty: float) -> None:
    model, graphs = exported
    got = translate_ids(
        graphs, SOURCES, beam_size=4, n_best=4, length_penalty=length_penalty, max_output_tokens=MAX_OUT
    )
    want = beam_search(model, padded(SOURCES), MAX_OUT, beam_size=4, n_best=4, length_penalty=length_penalty)
    for hyps, reference in zip(got, want, strict=True):
        assert_same(hyps, reference)


def test_pad_and_start_tokens_are_never_generated(tiny_model, tmp_path) -> None:
    # A model that would rather emit pad than anything else: both decoders skip pad and start
    # tokens (they stay in the softmax, so scores are unchanged) and still agree token for token.
    model = tiny_model(seed=3, vocab_size=VOCAB, final_logits_bias=True)
    with torch.no_grad():
        model.logits_bias[EOS], model.logits_bias[PAD], model.logits_bias[BOS] = 2.0, 4.0, 4.0
    graphs = export(model, tmp_path)
    greedy = translate_ids(graphs, SOURCES, max_output_tokens=MAX_OUT)
    beams = translate_ids(graphs, SOURCES, beam_size=4, n_best=4, max_output_tokens=MAX_OUT)
    assert not any({PAD, BOS} & set(h.tokens) for hyps in greedy + beams for h in hyps)
    for hyps, reference in zip(greedy, greedy_decode(model, padded(SOURCES), MAX_OUT), strict=True):
        assert_same(hyps, [reference])
    for hyps, references in zip(beams, beam_search(model, padded(SOURCES), MAX_OUT, n_best=4), strict=True):
        assert_same(hyps, references)


def test_the_models_make_non_trivial_hypotheses(exported) -> None:
    # Guards the tests above against a model whose outputs are all alike.
    _, graphs = exported
    hyps = [h for hs in translate_ids(graphs, SOURCES, beam_size=4, n_best=4) for h in hs]
    assert any(h.finished for h in hyps)
    assert len({len(h.tokens) for h in hyps}) >= 3


# --- batch invariance and the no-cache baselines ---------------------------------------------------


@pytest.mark.parametrize("beam_size", [1, 4])
def test_a_sentence_decodes_the_same_alone_and_among_neighbours(exported, beam_size: int) -> None:
    _, graphs = exported
    # Default limits: each sentence's own, so this also checks that the limit is per sentence.
    batch = translate_ids(graphs, SOURCES, beam_size=beam_size, n_best=beam_size)
    for source, hyps in zip(SOURCES, batch, strict=True):
        (alone,) = translate_ids(graphs, [source], beam_size=beam_size, n_best=beam_size)
        assert_same(hyps, alone, abs_tol=1e-5)


@pytest.mark.parametrize("method", ["replay", "attention"])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_without_cache_gives_the_same_hypotheses(exported, method, beam_size: int) -> None:
    _, graphs = exported
    cached = translate_ids(graphs, SOURCES, beam_size=beam_size, n_best=beam_size)
    recomputed = translate_ids_without_cache(
        graphs, SOURCES, beam_size=beam_size, n_best=beam_size, method=method
    )
    for a, b in zip(cached, recomputed, strict=True):
        assert_same(a, b, abs_tol=1e-5)


# --- rows joining a running batch (what the server's scheduler does) -------------------------------


@pytest.mark.parametrize("beam_size", [1, 3])
def test_rows_joining_a_running_batch_decode_as_if_alone(exported, beam_size: int) -> None:
    _, graphs = exported
    arrivals = [0, 2, 2, 5, 1]
    got = translate_ids_staggered(
        graphs, SOURCES, arrivals, beam_size=beam_size, n_best=beam_size, max_output_tokens=MAX_OUT
    )
    for source, hyps in zip(SOURCES, got, strict=True):
        (alone,) = translate_ids(
            graphs, [source], beam_size=beam_size, n_best=beam_size, max_output_tokens=MAX_OUT
        )
        assert_same(hyps, alone, abs_tol=1e-5)


# --- texts, limits, errors -------------------------------------------------------------------------


def test_translate_texts(exported) -> None:
    _, graphs = exported
    tokenizer = Tokenizer.from_file(graphs.model_dir / TOKENIZER_FILE)
    texts = ["w5 w9 w11", "", "w7 w8 w12 w13 w14 w15", "  ", "w19 w4"]
    got = translate_texts(graphs, None, texts, beam_size=2)
    want = [
        tokenizer.decode(list(hyps[0].tokens))
        for hyps in translate_ids(
            graphs, [tokenizer.encode_source(t, 32) for t in texts if t.strip()], beam_size=2
        )
    ]
    assert got == [want[0], "", want[1], "", want[2]]
    with pytest.raises(InputTooLongError, match="32"):
        translate_texts(graphs, tokenizer, ["w5 " * 40])


def test_limits_and_bad_input(exported) -> None:
    _, graphs = exported
    for hyps in translate_ids(graphs, SOURCES, beam_size=3, n_best=3, max_output_tokens=2):
        assert all(len(h.tokens) + h.finished <= 2 for h in hyps)
    assert translate_ids(graphs, SOURCES[:1], max_output_tokens=0) == [[Hypothesis((), 0.0, False)]]
    assert translate_ids(graphs, []) == []
    with pytest.raises(ValueError, match="end token"):
        translate_ids(graphs, [[5, 6]])
    with pytest.raises(ValueError, match="max_positions"):
        translate_ids(graphs, SOURCES, max_output_tokens=33)
    with pytest.raises(ValueError, match="n_best"):
        translate_ids(graphs, SOURCES, beam_size=2, n_best=3)


def test_graphs_follow_the_contract_and_refuse_a_tampered_directory(exported, tmp_path) -> None:
    model, graphs = exported
    cfg = model.cfg
    src = np.array([[5, 9, 2], [7, 2, PAD]])
    tgt = np.array([[BOS, 4, 6, 8], [BOS, 5, PAD, PAD]])
    memory, cross_k, cross_v = graphs.encode(src, src != PAD)
    assert memory.shape == (2, 3, cfg.d_model)
    assert cross_k.shape == cross_v.shape == (cfg.n_decoder_layers, 2, cfg.n_heads, 3, cfg.d_k)
    attention = graphs.attention(src, src != PAD, tgt, tgt != PAD)
    assert attention.log_probs.shape == (2, 4, VOCAB)
    assert attention.cross_attention.shape == (cfg.n_decoder_layers, 2, cfg.n_heads, 4, 3)
    assert graphs.float_dtype is np.float32 and graphs.dims.vocab_size == VOCAB

    copy = tmp_path / "copy"
    shutil.copytree(graphs.model_dir, copy)
    OnnxGraphs(copy)  # an intact copy loads
    with (copy / TOKENIZER_FILE).open("a") as f:
        f.write(" ")
    with pytest.raises(ModelDirectoryError, match="checksum"):
        OnnxGraphs(copy)
