"""export.variants.fused_step: the decoder step rebuilt from fused kernels computes the traced one.

Tiny random models of every architecture option the importers produce (post- and pre-norm, relu,
gelu and swish, tied and untied output, a final logits bias, unscaled embeddings, Marian's and
fairseq's sinusoids) are exported as model directories; the fused step must give the traced step's
outputs within 1e-4 with an empty cache and with a part-masked one, and its 8-bit block-quantized
form (the int8 variant's decoder step) must decode a row alike alone and in a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.model_config import TransformerConfig
from export.onnx.contract import example_inputs
from export.onnx.directory import export_model_directory
from export.variants.fused_step import build_fused_step
from export.variants.graphs import quantize_weight_blocks
from service.modeldir.manifest import load_manifest
from tests.export.test_onnx_export import VOCAB, write_tiny_checkpoint

ATOL = 1e-4
CONFIGS: dict[str, dict[str, Any]] = {
    "post-relu-tied": {},
    "pre-gelu-untied-bias": {
        "norm_placement": "pre",
        "activation": "gelu",
        "share_embeddings": False,
        "tie_output_embeddings": False,
        "final_logits_bias": True,
        "source_vocab_size": VOCAB + 20,
    },
    "post-swish-marian-unscaled": {
        "activation": "swish",
        "position_layout": "marian",
        "scale_embeddings": False,
        "final_logits_bias": True,
    },
    "pre-relu-fairseq": {"norm_placement": "pre", "position_layout": "fairseq", "position_offset": 1},
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[..., Any]
) -> Path:
    directory = tmp_path_factory.mktemp(request.param)
    write_tiny_checkpoint(directory, tiny_model(seed=5, vocab_size=VOCAB, **CONFIGS[request.param]))
    export_model_directory(directory, name="tiny", version="0.0.1")
    return directory


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _inputs(model_dir: Path, batch: int, cache_len: int, seed: int = 1) -> dict[str, np.ndarray]:
    manifest = load_manifest(model_dir)
    cfg = TransformerConfig.from_dict(dict(manifest.architecture))
    sizes = {"batch": batch, "src_len": 7, "tgt_len": 1, "cache_len": cache_len}
    return example_inputs(cfg, manifest.graphs["decoder_step"], sizes, seed=seed)


@pytest.mark.parametrize("cache_len", [0, 5])
def test_the_fused_step_computes_the_traced_one(model_dir: Path, cache_len: int) -> None:
    manifest = load_manifest(model_dir)
    fused = build_fused_step(model_dir, manifest)
    assert len(fused.graph.node) < len(onnx.load(str(model_dir / "decoder_step.onnx")).graph.node) / 2
    feeds = _inputs(model_dir, batch=3, cache_len=cache_len)
    if cache_len:
        assert not feeds["self_mask"].all(), "the example must mask some past slots"
    want = _session(model_dir / "decoder_step.onnx").run(None, feeds)
    got = _session(fused).run(None, feeds)
    for name, g, w in zip(("log_probs", "new_k", "new_v"), got, want, strict=True):
        assert g.shape == w.shape, name
        assert np.abs(g - w).max() <= ATOL, name


def test_the_quantized_fused_step_decodes_a_row_alike_alone_and_in_a_batch(model_dir: Path) -> None:
    quantized = quantize_weight_blocks(build_fused_step(model_dir, load_manifest(model_dir)))
    assert {n.op_type for n in quantized.graph.node} >= {"MatMulNBits"}
    assert "MatMul" not in {n.op_type for n in quantized.graph.node}
    session = _session(quantized)
    feeds = _inputs(model_dir, batch=6, cache_len=4)
    together = session.run(None, feeds)
    for row in range(6):
        alone = session.run(None, {k: v[row : row + 1] for k, v in feeds.items()})
        assert np.array_equal(alone[0][0], together[0][row])
        assert np.array_equal(alone[1][:, 0], together[1][:, row])
    traced = _session(model_dir / "decoder_step.onnx").run(None, feeds)
    assert np.abs(together[0] - traced[0]).max() < 0.1  # 8-bit weights: close, not equal
