"""export.variants.fused_step: the in-place decoder step rebuilt from fused kernels computes the traced one.

Tiny random models of every architecture option the importers produce (post- and pre-norm, relu,
gelu and swish, tied and untied output, a final logits bias, unscaled embeddings, Marian's and
fairseq's sinusoids) are exported as model directories. Over a cache whose rows hold 0 to 5 real
slots (the rest random: they must not matter), the fused step must give the traced step's
log-probs within 1e-4 and write the traced step's new keys/values into each row's next slot,
touching nothing else; its 8-bit block-quantized form (the int8 variant's decoder step) must decode
a row alike alone and in a batch.
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
from export.onnx.contract import example_inputs, in_place_step_spec
from export.onnx.directory import export_model_directory
from export.variants.fused_step import build_fused_step
from export.variants.graphs import quantize_weight_blocks
from service.engine.graphs import InPlaceBinding
from service.engine.kv_cache import StepInputs
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


SLOTS = 8  # the cache's slot capacity; rows hold POSITIONS[b] real slots


def _traced_inputs(model_dir: Path, positions: list[int], seed: int = 1) -> dict[str, np.ndarray]:
    """The traced step's inputs for a cache of SLOTS slots whose row b has positions[b] real ones
    (a prefix), every slot (masked or not) random."""
    manifest = load_manifest(model_dir)
    cfg = TransformerConfig.from_dict(dict(manifest.architecture))
    sizes = {"batch": len(positions), "src_len": 7, "tgt_len": 1, "cache_len": SLOTS}
    feeds = example_inputs(cfg, manifest.graphs["decoder_step"], sizes, seed=seed)
    feeds["self_mask"] = np.arange(SLOTS) < np.array(positions)[:, None]
    feeds["positions"] = np.array(positions, np.int64)
    return feeds


def _in_place(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, StepInputs]:
    """Run the in-place step on the traced feeds' cache (copied); its log-probs and the cache."""
    layers = sum(1 for name in feeds if name.startswith("past_k_"))

    def stacked(prefix: str) -> np.ndarray:
        return np.stack([feeds[f"{prefix}_{layer}"] for layer in range(layers)])

    inputs = StepInputs(
        positions=feeds["positions"],
        past_k=stacked("past_k"),
        past_v=stacked("past_v"),
        cross_k=stacked("cross_k"),
        cross_v=stacked("cross_v"),
        src_mask=np.ascontiguousarray(feeds["src_mask"]),
    )
    binding = InPlaceBinding(session, inputs, session.get_outputs()[0].shape[1])
    return binding.run(feeds["tokens"][:, 0], inputs.positions).copy(), inputs


POSITIONS = [0, 3, 5, 1]


def test_the_fused_step_computes_the_traced_one_in_place(model_dir: Path) -> None:
    manifest = load_manifest(model_dir)
    fused = build_fused_step(model_dir, manifest)
    assert len(fused.graph.node) < len(onnx.load(str(model_dir / "decoder_step.onnx")).graph.node) / 2
    cfg = TransformerConfig.from_dict(dict(manifest.architecture))
    assert [i.name for i in fused.graph.input] == [t.name for t in in_place_step_spec(cfg).inputs]
    feeds = _traced_inputs(model_dir, POSITIONS)
    log_probs, new_k, new_v = _session(model_dir / "decoder_step.onnx").run(None, feeds)
    got, cache = _in_place(_session(fused), feeds)
    assert np.abs(got - log_probs).max() <= ATOL
    rows = np.arange(len(POSITIONS))
    for written, before, new in ((cache.past_k, "past_k", new_k), (cache.past_v, "past_v", new_v)):
        slots = written[:, rows, :, POSITIONS]  # (B, L, H, Dh): each row's next slot
        assert np.abs(slots.transpose(1, 0, 2, 3) - new).max() <= ATOL
        untouched = np.ones(written.shape, dtype=bool)
        untouched[:, rows, :, POSITIONS] = False
        original = np.stack([feeds[f"{before}_{layer}"] for layer in range(written.shape[0])])
        assert np.array_equal(written[untouched], original[untouched])


def test_the_quantized_fused_step_decodes_a_row_alike_alone_and_in_a_batch(model_dir: Path) -> None:
    quantized = quantize_weight_blocks(build_fused_step(model_dir, load_manifest(model_dir)))
    assert {n.op_type for n in quantized.graph.node} >= {"MatMulNBits"}
    assert "MatMul" not in {n.op_type for n in quantized.graph.node}
    session = _session(quantized)
    positions = [4, 0, 2, 4, 1, 3]
    feeds = _traced_inputs(model_dir, positions)
    together, batch = _in_place(session, feeds)
    for row in range(len(positions)):
        alone, single = _in_place(session, {k: v[row : row + 1] for k, v in feeds.items()})
        assert np.array_equal(alone[0], together[row])
        assert np.array_equal(single.past_k[:, 0], batch.past_k[:, row])
    traced = _session(model_dir / "decoder_step.onnx").run(None, feeds)
    assert np.abs(together - traced[0]).max() < 0.1  # 8-bit weights: close, not equal
