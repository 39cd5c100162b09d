"""The ONNX graphs against PyTorch: a tiny random checkpoint exported into a tmp directory.

onnxruntime (CPU) must agree with the model within 1e-4 on padded batches, the cached decoder
steps must reproduce a teacher-forced pass, the graph files must carry no weights of their own,
and a re-export must be byte-identical.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from export.__main__ import main as export_main
from export.checkpoint import TOKENIZER_FILE, WEIGHTS_FILE, load_model, save_model
from export.graph_contract import GRAPH_FILES, graph_specs
from export.model import Transformer, padding_mask
from export.onnx_directory import export_model_directory
from export.onnx_export import DecoderStepGraph
from export.onnx_weights import INLINE_LIMIT_BYTES, SafetensorsIndex, inline_bytes, link_external_weights
from export.tokenizer_training import train_tokenizer

ATOL = 1e-4
# Byte-level BPE has 256 byte tokens + 4 specials: the tiny model's vocabulary must hold them.
VOCAB = 300
CONFIGS = {
    "post-norm-tied": {},
    "pre-norm-untied": {
        "norm_placement": "pre",
        "activation": "gelu",
        "share_embeddings": False,
        "tie_output_embeddings": False,
        "final_logits_bias": True,
    },
}
_PAIRS = [("the cat sleeps", "le chat dort"), ("a red house", "une maison rouge")] * 4


def write_tiny_checkpoint(model_dir: Path, model: Transformer) -> Path:
    """A checkpoint directory (config, weights, tokenizer) for `model`; a tiny trained tokenizer."""
    with torch.no_grad():  # a trained model has non-zero biases; equal tensors would hide bugs
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.1)
    save_model(model, model_dir)
    train_tokenizer(_PAIRS, VOCAB).save(str(model_dir / TOKENIZER_FILE))
    return model_dir


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[..., Any]
) -> tuple[Transformer, Path]:
    """(model as loaded back from its checkpoint, model directory with graphs and manifest)."""
    model_dir = tmp_path_factory.mktemp(request.param)
    write_tiny_checkpoint(model_dir, tiny_model(seed=3, vocab_size=VOCAB, **CONFIGS[request.param]))
    export_model_directory(model_dir, name="tiny", version="0.0.1")
    return load_model(model_dir), model_dir


@functools.cache
def _session(model_dir: Path, graph: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_dir / GRAPH_FILES[graph]), providers=["CPUExecutionProvider"])


def _max_diff(got: np.ndarray, want: torch.Tensor) -> float:
    assert got.shape == tuple(want.shape)
    return float(np.max(np.abs(got - want.numpy())))


def _random_ids(lengths: list[int], padded: Callable[..., torch.Tensor], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return padded([torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths])


def _encode(model_dir: Path, src: torch.Tensor) -> list[np.ndarray]:
    return _session(model_dir, "encoder").run(None, {"src_ids": src.numpy(), "src_mask": (src != 0).numpy()})


@torch.no_grad()
def _reference_next(model: Transformer, src: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-probabilities after each prefix position: (B, T, V)."""
    src_mask = padding_mask(src, model.cfg.pad_id)
    hidden = model.decode(model.encode(src, src_mask), src_mask, prefix, model.target_mask(prefix))
    return F.log_softmax(model.logits(hidden), dim=-1)


@torch.no_grad()
def test_encoder_matches_pytorch(exported: tuple[Transformer, Path], padded: Callable) -> None:
    model, model_dir = exported
    src = _random_ids([7, 3, 5], padded, seed=0)
    memory, cross_k, cross_v = _encode(model_dir, src)
    want_memory = model.encode(src, padding_mask(src, 0))
    want_kv = model.cross_kv(want_memory)
    assert _max_diff(memory, want_memory) <= ATOL
    assert _max_diff(cross_k, torch.stack([k for k, _ in want_kv])) <= ATOL
    assert _max_diff(cross_v, torch.stack([v for _, v in want_kv])) <= ATOL


def _step_feed(
    tokens: np.ndarray,
    positions: np.ndarray,
    past_k: np.ndarray,
    past_v: np.ndarray,
    self_mask: np.ndarray,
    cross: list[np.ndarray],
    src_mask: np.ndarray,
) -> dict[str, np.ndarray]:
    return {
        "tokens": tokens,
        "positions": positions,
        "past_k": past_k,
        "past_v": past_v,
        "self_mask": self_mask,
        "cross_k": cross[1],
        "cross_v": cross[2],
        "src_mask": src_mask,
    }


@torch.no_grad()
def test_first_step_with_empty_past(exported: tuple[Transformer, Path], padded: Callable) -> None:
    model, model_dir = exported
    cfg = model.cfg
    src = _random_ids([6, 2, 4], padded, seed=1)
    batch = src.size(0)
    empty = np.zeros((cfg.n_decoder_layers, batch, cfg.n_heads, 0, cfg.d_k), dtype=np.float32)
    feed = _step_feed(
        np.full((batch, 1), cfg.bos_id),
        np.zeros(batch, dtype=np.int64),
        empty,
        empty,
        np.ones((batch, 1), dtype=bool),
        _encode(model_dir, src),
        (src != 0).numpy(),
    )
    log_probs, present_k, present_v = _session(model_dir, "decoder_step").run(None, feed)
    bos = torch.full((batch, 1), cfg.bos_id)
    assert _max_diff(log_probs, _reference_next(model, src, bos)[:, 0]) <= ATOL
    want = DecoderStepGraph(model).eval()(*(torch.from_numpy(v) for v in feed.values()))
    for got, expected in zip((log_probs, present_k, present_v), want, strict=True):
        assert _max_diff(got, expected) <= ATOL
    assert present_k.shape[3] == 1


@torch.no_grad()
def test_cached_steps_equal_teacher_forced_pass(exported: tuple[Transformer, Path], padded: Callable) -> None:
    model, model_dir = exported
    cfg = model.cfg
    src = _random_ids([5, 8], padded, seed=2)
    prefix = torch.cat([torch.full((2, 1), cfg.bos_id), _random_ids([6, 6], padded, seed=3)], dim=1)
    want = _reference_next(model, src, prefix)  # (B, 7, V)
    cross, src_mask = _encode(model_dir, src), (src != 0).numpy()
    session = _session(model_dir, "decoder_step")
    past_k = past_v = np.zeros((cfg.n_decoder_layers, 2, cfg.n_heads, 0, cfg.d_k), dtype=np.float32)
    for t in range(prefix.size(1)):
        feed = _step_feed(
            prefix[:, t : t + 1].numpy(),
            np.full(2, t),
            past_k,
            past_v,
            np.ones((2, t + 1), dtype=bool),
            cross,
            src_mask,
        )
        log_probs, past_k, past_v = session.run(None, feed)
        assert _max_diff(log_probs, want[:, t]) <= ATOL, f"step {t}"


@torch.no_grad()
def test_step_with_rows_of_different_past_and_source_lengths(
    exported: tuple[Transformer, Path], padded: Callable
) -> None:
    """A ragged batch: each row's cache is left-padded with garbage slots that self_mask hides,
    sources are padded; every row must equal that row decoded alone."""
    model, model_dir = exported
    cfg = model.cfg
    lengths = [4, 2, 1]  # prefix tokens per row, start token included; the last one is the new token
    src = _random_ids([3, 7, 5], padded, seed=4)
    prefixes = [[cfg.bos_id, *_random_ids([n - 1], padded, seed=5 + n)[0].tolist()] for n in lengths]
    session = _session(model_dir, "decoder_step")
    layers, heads, dk = cfg.n_decoder_layers, cfg.n_heads, cfg.d_k

    def run_alone(row: int) -> list[np.ndarray]:
        """The row's cache built step by step, batch 1, unpadded source."""
        row_src = src[row : row + 1, : int((src[row] != 0).sum())]
        cross, mask = _encode(model_dir, row_src), (row_src != 0).numpy()
        k = v = np.zeros((layers, 1, heads, 0, dk), dtype=np.float32)
        outputs: list[np.ndarray] = []
        for t, token in enumerate(prefixes[row]):
            self_mask = np.ones((1, t + 1), dtype=bool)
            feed = _step_feed(np.array([[token]]), np.array([t]), k, v, self_mask, cross, mask)
            outputs = session.run(None, feed)
            _, k, v = outputs
        return outputs

    alone = [run_alone(r) for r in range(len(lengths))]
    past = max(lengths) - 1
    rng = np.random.default_rng(0)
    past_k = rng.standard_normal((layers, len(lengths), heads, past, dk)).astype(np.float32)
    past_v = rng.standard_normal(past_k.shape).astype(np.float32)
    self_mask = np.zeros((len(lengths), past + 1), dtype=bool)
    for r, n in enumerate(lengths):
        real = n - 1  # cached tokens of this row, right-aligned; the slots before them are garbage
        if real:
            past_k[:, r, :, past - real :] = alone[r][1][:, 0, :, :real]
            past_v[:, r, :, past - real :] = alone[r][2][:, 0, :, :real]
        self_mask[r, past - real :] = True
    feed = _step_feed(
        np.array([[p[-1]] for p in prefixes]),
        np.array([n - 1 for n in lengths]),
        past_k,
        past_v,
        self_mask,
        _encode(model_dir, src),
        (src != 0).numpy(),
    )
    log_probs, present_k, _ = session.run(None, feed)
    assert present_k.shape == (layers, len(lengths), heads, past + 1, dk)
    for r, n in enumerate(lengths):
        row_src = src[r : r + 1, : int((src[r] != 0).sum())]
        want = _reference_next(model, row_src, torch.tensor([prefixes[r]]))[0, -1]
        assert _max_diff(log_probs[r], want) <= ATOL, f"row {r}"
        assert np.abs(present_k[:, r, :, past + 1 - n :] - alone[r][1][:, 0]).max() <= ATOL


@torch.no_grad()
def test_attention_graph_matches_pytorch(exported: tuple[Transformer, Path], padded: Callable) -> None:
    model, model_dir = exported
    src = _random_ids([6, 3], padded, seed=6)
    tgt = torch.cat([torch.full((2, 1), model.cfg.bos_id), _random_ids([4, 2], padded, seed=7)], dim=1)
    got = _session(model_dir, "attention").run(
        None,
        {
            "src_ids": src.numpy(),
            "src_mask": (src != 0).numpy(),
            "tgt_ids": tgt.numpy(),
            "tgt_mask": (tgt != 0).numpy(),
        },
    )
    log_probs, maps = model.attention_maps(src, tgt)
    want = [log_probs, *(torch.stack(m) for m in (maps.encoder_self, maps.decoder_self, maps.cross))]
    for name, g, w in zip(("log_probs", "encoder", "decoder", "cross"), got, want, strict=True):
        assert _max_diff(g, w) <= ATOL, name


def test_graphs_carry_no_weights(exported: tuple[Transformer, Path]) -> None:
    model, model_dir = exported
    weights = SafetensorsIndex(model_dir / WEIGHTS_FILE)
    size = (model_dir / WEIGHTS_FILE).stat().st_size
    for file in GRAPH_FILES.values():
        graph = onnx.load(str(model_dir / file), load_external_data=False)
        external = [t for t in graph.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        assert external, file
        for tensor in external:
            ref = {e.key: e.value for e in tensor.external_data}
            assert ref["location"] == WEIGHTS_FILE
            assert int(ref["offset"]) + int(ref["length"]) <= size
        inline = [t for t in graph.graph.initializer if t.data_location != TensorProto.EXTERNAL]
        inline += [a.t for node in graph.graph.node for a in node.attribute if a.name == "value"]
        for array in map(numpy_helper.to_array, inline):  # no stored tensor, nor a transposed copy
            assert weights.find(array) is None
            assert array.ndim != 2 or weights.find(array.T) is None
        # Only the positional table (derived from the config, never stored) and small constants.
        assert inline_bytes(graph) <= model.positions.numpy().nbytes + INLINE_LIMIT_BYTES, file


def test_reexport_is_byte_identical(
    exported: tuple[Transformer, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, model_dir = exported
    out = tmp_path / "again"
    argv = ["--model-dir", str(model_dir), "--out", str(out), "--name", "tiny", "--version", "0.0.1"]
    monkeypatch.setattr(sys, "argv", ["export", *argv])
    export_main()  # the CLI, exporting into another directory
    for file in [*GRAPH_FILES.values(), "manifest.json", WEIGHTS_FILE, "config.json"]:
        assert (out / file).read_bytes() == (model_dir / file).read_bytes(), file
    listed = json.loads((out / "manifest.json").read_text())["files"]
    assert sorted(listed) == sorted([*GRAPH_FILES.values(), WEIGHTS_FILE, TOKENIZER_FILE])


def test_link_refuses_a_weight_that_is_not_stored(tmp_path: Path, tiny_model: Callable[..., Any]) -> None:
    model_dir = write_tiny_checkpoint(tmp_path / "ckpt", tiny_model(vocab_size=VOCAB))
    stray = numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), "stray")
    node = helper.make_node("Identity", ["stray"], ["out"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [64, 64])
    graph = helper.make_model(helper.make_graph([node], "g", [], [out], initializer=[stray]))
    with pytest.raises(ValueError, match=r"'stray'.*own weights"):
        link_external_weights(graph, SafetensorsIndex(model_dir / WEIGHTS_FILE), location=WEIGHTS_FILE)


def test_fp16_specs_keep_log_probs_in_float32(tiny_config: Callable[..., Any]) -> None:
    specs = graph_specs(tiny_config(), "float16")
    dtypes = {t.name: t.dtype for g in specs.values() for t in (*g.inputs, *g.outputs)}
    assert dtypes["log_probs"] == "float32"
    assert {dtypes[n] for n in ("memory", "past_k", "present_v", "cross_attention")} == {"float16"}
    assert dtypes["src_mask"] == "bool" and dtypes["tokens"] == "int64"
