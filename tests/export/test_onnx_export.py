"""The ONNX graphs against PyTorch: a tiny random checkpoint exported into a tmp directory.

onnxruntime (CPU) must agree with the model within 1e-4 on padded batches, the cached decoder
steps (each writing its K/V into a caller's buffer) must reproduce a teacher-forced pass, the
graph files must carry no weights of their own, and a re-export must be byte-identical.
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
from export.model import Transformer, padding_mask
from export.onnx.contract import GRAPH_FILES, graph_specs
from export.onnx.directory import export_model_directory
from export.onnx.export import DecoderStepGraph
from export.onnx.weights import INLINE_LIMIT_BYTES, SafetensorsIndex, inline_bytes, link_external_weights
from export.training.tokenizer import train_tokenizer

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
        "source_vocab_size": VOCAB + 20,  # a source vocabulary of its own, larger than the target's
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
    """The decoder step's inputs, its per-layer caches fed from (L, B, H, T, Dh) buffers."""
    feed = {"tokens": tokens, "positions": positions, "self_mask": self_mask, "src_mask": src_mask}
    for layer in range(past_k.shape[0]):
        feed |= {f"past_k_{layer}": past_k[layer], f"past_v_{layer}": past_v[layer]}
    for layer in range(past_k.shape[0]):
        feed |= {f"cross_k_{layer}": cross[1][layer], f"cross_v_{layer}": cross[2][layer]}
    return feed


def _empty_cache(cfg: Any, batch: int, slots: int) -> np.ndarray:
    return np.zeros((cfg.n_decoder_layers, batch, cfg.n_heads, slots, cfg.d_k), dtype=np.float32)


@torch.no_grad()
def test_decoder_step_signature(exported: tuple[Transformer, Path]) -> None:
    model, model_dir = exported
    cfg = model.cfg
    session = _session(model_dir, "decoder_step")
    layers = range(cfg.n_decoder_layers)
    assert [i.name for i in session.get_inputs()] == [
        "tokens",
        "positions",
        "self_mask",
        "src_mask",
        *(f"past_{kv}_{layer}" for layer in layers for kv in "kv"),
        *(f"cross_{kv}_{layer}" for layer in layers for kv in "kv"),
    ]
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert outputs == {
        "log_probs": ["batch", VOCAB],
        "new_k": [cfg.n_decoder_layers, "batch", cfg.n_heads, cfg.d_k],
        "new_v": [cfg.n_decoder_layers, "batch", cfg.n_heads, cfg.d_k],
    }
    # The cache is only read: no node concatenates it with the new token's K/V (a copy per step).
    graph = onnx.load(str(model_dir / GRAPH_FILES["decoder_step"]), load_external_data=False).graph
    past = {i.name for i in graph.input if i.name.startswith("past_")}
    assert not [n.name for n in graph.node if n.op_type == "Concat" and past & set(n.input)]


@torch.no_grad()
def test_first_step_with_empty_cache(exported: tuple[Transformer, Path], padded: Callable) -> None:
    model, model_dir = exported
    cfg = model.cfg
    src = _random_ids([6, 2, 4], padded, seed=1)
    batch = src.size(0)
    empty = _empty_cache(cfg, batch, 0)
    feed = _step_feed(
        np.full((batch, 1), cfg.bos_id),
        np.zeros(batch, dtype=np.int64),
        empty,
        empty,
        np.ones((batch, 0), dtype=bool),
        _encode(model_dir, src),
        (src != 0).numpy(),
    )
    log_probs, new_k, new_v = _session(model_dir, "decoder_step").run(None, feed)
    bos = torch.full((batch, 1), cfg.bos_id)
    assert _max_diff(log_probs, _reference_next(model, src, bos)[:, 0]) <= ATOL
    want = DecoderStepGraph(model).eval()(*(torch.from_numpy(v) for v in feed.values()))
    for got, expected in zip((log_probs, new_k, new_v), want, strict=True):
        assert _max_diff(got, expected) <= ATOL
    assert new_k.shape == (cfg.n_decoder_layers, batch, cfg.n_heads, cfg.d_k)


@torch.no_grad()
def test_cached_steps_equal_teacher_forced_pass(exported: tuple[Transformer, Path], padded: Callable) -> None:
    """Steps over a buffer allocated once, each token's K/V written into a slot of its own, the
    slots not in order (a slot's place in the buffer must not matter, only the mask)."""
    model, model_dir = exported
    cfg = model.cfg
    src = _random_ids([5, 8], padded, seed=2)
    prefix = torch.cat([torch.full((2, 1), cfg.bos_id), _random_ids([6, 6], padded, seed=3)], dim=1)
    want = _reference_next(model, src, prefix)  # (B, 7, V)
    cross, src_mask = _encode(model_dir, src), (src != 0).numpy()
    session = _session(model_dir, "decoder_step")
    steps = prefix.size(1)
    past_k, past_v = _empty_cache(cfg, 2, steps + 1), _empty_cache(cfg, 2, steps + 1)
    past_k[:] = past_v[:] = 1e3  # free slots hold garbage: only the mask keeps them out
    self_mask = np.zeros((2, steps + 1), dtype=bool)
    slots = np.random.default_rng(0).permutation(steps + 1)[:steps]
    for t, slot in enumerate(slots):
        feed = _step_feed(
            prefix[:, t : t + 1].numpy(), np.full(2, t), past_k, past_v, self_mask, cross, src_mask
        )
        log_probs, new_k, new_v = session.run(None, feed)
        assert _max_diff(log_probs, want[:, t]) <= ATOL, f"step {t}"
        past_k[:, :, :, slot], past_v[:, :, :, slot] = new_k, new_v
        self_mask[:, slot] = True


@torch.no_grad()
def test_step_with_rows_of_different_past_and_source_lengths(
    exported: tuple[Transformer, Path], padded: Callable
) -> None:
    """A ragged batch: each row's real cache slots are scattered among garbage slots that
    self_mask hides, sources are padded; every row must equal that row decoded alone."""
    model, model_dir = exported
    cfg = model.cfg
    lengths = [4, 2, 1]  # prefix tokens per row, start token included; the last one is the new token
    src = _random_ids([3, 7, 5], padded, seed=4)
    prefixes = [[cfg.bos_id, *_random_ids([n - 1], padded, seed=5 + n)[0].tolist()] for n in lengths]
    session = _session(model_dir, "decoder_step")

    def run_alone(row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The row decoded alone (batch 1, unpadded source) → its tokens' K and V (L, H, n, Dh) and
        the log-probs after its last token."""
        row_src = src[row : row + 1, : int((src[row] != 0).sum())]
        cross, mask = _encode(model_dir, row_src), (row_src != 0).numpy()
        n = len(prefixes[row])
        k, v = _empty_cache(cfg, 1, n), _empty_cache(cfg, 1, n)
        for t, token in enumerate(prefixes[row]):
            feed = _step_feed(
                np.array([[token]]),
                np.array([t]),
                k[:, :, :, :t],
                v[:, :, :, :t],
                np.ones((1, t), dtype=bool),
                cross,
                mask,
            )
            log_probs, k[:, :, :, t], v[:, :, :, t] = session.run(None, feed)
        return k[:, 0], v[:, 0], log_probs[0]

    alone = [run_alone(r) for r in range(len(lengths))]
    slots = 2 * max(lengths)
    rng = np.random.default_rng(0)
    past_k = rng.standard_normal((cfg.n_decoder_layers, len(lengths), cfg.n_heads, slots, cfg.d_k))
    past_k = past_k.astype(np.float32)
    past_v = rng.standard_normal(past_k.shape).astype(np.float32)
    self_mask = np.zeros((len(lengths), slots), dtype=bool)
    for r, n in enumerate(lengths):
        # This row's cached tokens, in slots anywhere in the buffer and in no particular order.
        for t, slot in enumerate(rng.choice(slots, size=n - 1, replace=False)):
            past_k[:, r, :, slot], past_v[:, r, :, slot] = alone[r][0][:, :, t], alone[r][1][:, :, t]
            self_mask[r, slot] = True
    feed = _step_feed(
        np.array([[p[-1]] for p in prefixes]),
        np.array([n - 1 for n in lengths]),
        past_k,
        past_v,
        self_mask,
        _encode(model_dir, src),
        (src != 0).numpy(),
    )
    log_probs, new_k, new_v = session.run(None, feed)
    for r, n in enumerate(lengths):
        row_src = src[r : r + 1, : int((src[r] != 0).sum())]
        want = _reference_next(model, row_src, torch.tensor([prefixes[r]]))[0, -1]
        assert _max_diff(log_probs[r], want) <= ATOL, f"row {r}"
        assert np.abs(log_probs[r] - alone[r][2]).max() <= ATOL, f"row {r}"
        assert np.abs(new_k[:, r] - alone[r][0][:, :, n - 1]).max() <= ATOL, f"row {r}"
        assert np.abs(new_v[:, r] - alone[r][1][:, :, n - 1]).max() <= ATOL, f"row {r}"


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
    assert {dtypes[n] for n in ("memory", "past_k_0", "new_v", "cross_k_1", "cross_attention")} == {"float16"}
    assert dtypes["src_mask"] == "bool" and dtypes["tokens"] == "int64"
