"""The derived variants of the default model: int8, fp16 and optimized, each checked against fp32.

`make setup` builds them into models/en-fr-small/<variant>/; the tests use those when they are
current (derived from the committed fp32 manifest), else build them into a tmp copy (≈10 s).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import export.variants.checks as checks
from export.corpus import CorpusConfig, generate_corpus
from export.model_config import TransformerConfig
from export.onnx.contract import graph_specs, in_place_step_spec
from export.translate import DEFAULT_MODEL_DIR
from export.variants import VARIANTS, BuildOptions, build_variants, main
from service.engine.graphs import OnnxGraphs
from service.engine.reference_decoder import translate_ids, translate_texts
from service.modeldir.manifest import (
    MANIFEST_FILE,
    ModelDirectoryError,
    derived_from_current,
    load_manifest,
    to_json,
)
from service.modeldir.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = 12  # test sentences translated by every variant here
FAST = BuildOptions(sentences=20, parity_sentences=20)


def _fp32_copy(target: Path) -> Path:
    """The default model's fp32 files (those its manifest lists) and manifest, copied to `target`."""
    target.mkdir()
    for name in [*load_manifest(DEFAULT_MODEL_DIR).files, MANIFEST_FILE]:
        shutil.copyfile(DEFAULT_MODEL_DIR / name, target / name)
    return target


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory whose variants are current: the default one, or a tmp copy built here."""
    if all(derived_from_current(DEFAULT_MODEL_DIR / v, DEFAULT_MODEL_DIR) for v in VARIANTS):
        return DEFAULT_MODEL_DIR
    model_dir = _fp32_copy(tmp_path_factory.mktemp("variants") / "en-fr-small")
    build_variants(model_dir, VARIANTS, FAST)
    return model_dir


@pytest.fixture(scope="module")
def fp32(model_dir: Path) -> OnnxGraphs:
    return OnnxGraphs(model_dir, intra_op_threads=1)


@pytest.fixture(scope="module")
def sample() -> list[tuple[str, str]]:
    return checks.read_test_split(Path("data/corpus"))[:SAMPLE]


def _load(model_dir: Path, variant: str) -> OnnxGraphs:
    """Verified against its manifest: every checksum, and each graph's signature at load."""
    return OnnxGraphs(model_dir / variant, intra_op_threads=1)


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


# ---------------------------------------------------------------------------------------------
# int8


def test_int8_quantizes_the_matmuls(model_dir: Path) -> None:
    graphs = _load(model_dir, "int8")
    assert graphs.manifest.variant == "int8"
    for name, spec in graphs.manifest.graphs.items():
        ops = _op_types(model_dir / "int8" / spec.file)
        if name == "decoder_step":  # rebuilt fused, 8-bit weight blocks (quantize_weight_blocks)
            assert "MatMulNBits" in ops and "MatMul" not in ops and "MatMulInteger" not in ops
            assert {"GroupQueryAttention", "MultiHeadAttention", "SkipLayerNormalization"} <= ops
            assert graphs.in_place
            continue
        # every activation row quantized on its own (export.variants.graphs.quantize_rows_apart)
        assert "MatMulInteger" in ops and "DynamicQuantizeLinear" not in ops, spec.file


@pytest.mark.parametrize("beam_size", [1, 4])
def test_int8_translates_like_fp32(
    model_dir: Path, fp32: OnnxGraphs, sample: list[tuple[str, str]], beam_size: int
) -> None:
    texts = [en for en, _ in sample]
    want = translate_texts(fp32, None, texts, beam_size=beam_size)
    assert translate_texts(_load(model_dir, "int8"), None, texts, beam_size=beam_size) == want


@pytest.mark.parametrize("beam_size", [1, 4])
def test_int8_decodes_a_sentence_alike_alone_and_in_any_batch(
    model_dir: Path, sample: list[tuple[str, str]], beam_size: int
) -> None:
    """The scheduler's promise (an output equals decoding that sentence alone) holds for the default
    CPU variant: every activation row is quantized on its own, so tokens and scores are identical
    to the bit alone, in a batch, and in a batch in another order (other padding around it)."""
    graphs = _load(model_dir, "int8")
    tokenizer = Tokenizer.from_file(model_dir / "int8" / graphs.manifest.tokenizer)
    sources = [tokenizer.encode_source(en, graphs.dims.max_positions) for en, _ in sample]

    def decoded(batch: list[list[int]]) -> list[list[tuple[tuple[int, ...], float]]]:
        return [
            [(h.tokens, h.score) for h in hyps] for hyps in translate_ids(graphs, batch, beam_size=beam_size)
        ]

    alone = [decoded([s])[0] for s in sources]
    assert decoded(sources) == alone
    assert decoded(sources[::-1])[::-1] == alone


def test_int8_quality_block(model_dir: Path) -> None:
    quality = load_manifest(model_dir / "int8").quality
    assert quality is not None
    assert quality["split"] == "test" and quality["sentences"] > 0
    assert quality["whole_split"] in (True, False) and quality["machine"]
    assert quality["max_bleu_drop"] == checks.MAX_BLEU_DROP
    for variant in ("int8", "fp32"):
        for decoder in ("greedy", "beam4"):
            scores = quality[variant][decoder]
            assert set(scores) == {"bleu", "chrf", "exact_match", "sentences", "seconds"}
            assert scores["sentences"] == quality["sentences"]
    for decoder, drop in quality["bleu_drop"].items():
        assert drop == pytest.approx(
            quality["fp32"][decoder]["bleu"] - quality["int8"][decoder]["bleu"], abs=0.02
        )
        assert drop <= checks.MAX_BLEU_DROP


def test_a_failed_quality_gate_leaves_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = _fp32_copy(tmp_path / "model")
    monkeypatch.setattr(checks, "MAX_BLEU_DROP", -1.0)  # a bar no variant can meet
    with pytest.raises(SystemExit) as exit_info:
        main(["--model-dir", str(model_dir), "--only", "int8", "--sentences", "4"])
    assert exit_info.value.code != 0
    assert "quality below the bar" in str(exit_info.value.code) and "BLEU" in str(exit_info.value.code)
    assert not (model_dir / "int8" / MANIFEST_FILE).exists()
    with pytest.raises(ModelDirectoryError, match="missing manifest"):
        OnnxGraphs(model_dir / "int8")


# ---------------------------------------------------------------------------------------------
# fp16


def test_fp16_signature_is_the_contracts(model_dir: Path) -> None:
    graphs = _load(model_dir, "fp16")  # each session's inputs/outputs checked against these specs
    cfg = TransformerConfig.from_dict(dict(graphs.manifest.architecture))
    assert dict(graphs.manifest.graphs) == graph_specs(cfg, "float16")
    assert graphs.float_dtype is np.float16


def test_fp16_weights_are_float16(model_dir: Path) -> None:
    """Every float initializer is float16 but the layer norms' scale and bias, kept float32."""
    for spec in load_manifest(model_dir / "fp16").graphs.values():
        graph = onnx.load(str(model_dir / "fp16" / spec.file)).graph
        float32 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
        float16 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
        assert len(float16) > len(float32) > 0, spec.file
        users = {n.op_type for n in graph.node if float32 & set(n.input)}
        assert users == {"LayerNormalization"}, spec.file


def test_fp16_records_what_was_checked(model_dir: Path) -> None:
    manifest = load_manifest(model_dir / "fp16")
    assert manifest.quality is None  # no translation figures: fp16 is for a GPU we did not have
    assert manifest.derivation is not None
    recorded = manifest.derivation["checks"]
    assert recorded["gpu_parity_checked"] is False
    assert set(recorded["cpu_parity"]["graphs"]) == set(manifest.graphs)
    assert recorded["cpu_parity"]["sentences"]["greedy_identical"] >= 0.95
    assert recorded["cpu_parity"]["sentences"]["max_abs_log_prob_diff"] < 0.1


# ---------------------------------------------------------------------------------------------
# optimized


def test_optimized_matches_fp32(model_dir: Path, fp32: OnnxGraphs) -> None:
    graphs = _load(model_dir, "optimized")
    cfg = TransformerConfig.from_dict(dict(fp32.manifest.architecture))
    assert graphs.manifest.variant == "fp32" and graphs.in_place
    assert graphs.manifest.graphs == {**fp32.manifest.graphs, "decoder_step": in_place_step_spec(cfg)}
    for graph, diffs in checks.graph_parity(fp32, graphs).items():
        assert max(diffs.values()) <= checks.OPTIMIZED_ATOL, (graph, diffs)
    fused = set().union(
        *(_op_types(model_dir / "optimized" / s.file) for s in graphs.manifest.graphs.values())
    )
    assert {"SkipLayerNormalization", "FusedMatMul"} <= fused


def test_optimized_translates_like_fp32(
    model_dir: Path, fp32: OnnxGraphs, sample: list[tuple[str, str]]
) -> None:
    tokenizer = Tokenizer.from_file(model_dir / fp32.manifest.tokenizer)
    parity = checks.sentence_parity(fp32, _load(model_dir, "optimized"), tokenizer, sample)
    assert parity["greedy_identical"] == 1.0
    assert parity["max_abs_log_prob_diff"] <= checks.OPTIMIZED_ATOL


def _parity(memory: float, identical: float = 1.0) -> dict[str, Any]:
    sentences = {"sentences": 3, "greedy_identical": identical, "max_abs_log_prob_diff": 1e-6}
    return {"graphs": {"encoder": {"memory": memory}}, "sentences": sentences}


def test_parity_is_refused_beyond_the_tolerance() -> None:
    checks.require_fp32_parity("optimized", _parity(1e-6))
    with pytest.raises(checks.VariantCheckError, match=r"encoder.memory by 2.00e-03"):
        checks.require_fp32_parity("optimized", _parity(2e-3))
    with pytest.raises(checks.VariantCheckError, match="token-identical"):
        checks.require_fp32_parity("optimized", _parity(1e-6, identical=2 / 3))
    checks.require_finite("fp16", _parity(0.5))
    with pytest.raises(checks.VariantCheckError, match=r"non-finite outputs on CPU: encoder.memory"):
        checks.require_finite("fp16", _parity(float("nan")))


# ---------------------------------------------------------------------------------------------
# The manifests and the directory


def test_each_variant_is_self_contained_and_current(model_dir: Path) -> None:
    fp32 = load_manifest(model_dir)
    for variant in VARIANTS:
        manifest = load_manifest(model_dir / variant)
        assert set(manifest.files) == {*(s.file for s in manifest.graphs.values()), manifest.tokenizer}
        assert (manifest.name, manifest.version, manifest.architecture) == (
            fp32.name,
            fp32.version,
            fp32.architecture,
        )
        assert manifest.derivation is not None and manifest.derivation["from"]["variant"] == "fp32"
        assert derived_from_current(model_dir / variant, model_dir)


def test_fp32_manifest_is_written_as_before_variants() -> None:
    """No `derivation` key in an exported manifest: the committed one reads and writes back
    byte-identically (re-exports stay byte-identical)."""
    manifest = load_manifest(DEFAULT_MODEL_DIR)
    assert manifest.derivation is None
    assert to_json(manifest) == (DEFAULT_MODEL_DIR / MANIFEST_FILE).read_text(encoding="utf-8")


def test_a_malformed_derivation_is_refused(tmp_path: Path, model_dir: Path) -> None:
    copy = Path(shutil.copytree(model_dir / "int8", tmp_path / "int8"))
    data = json.loads((copy / MANIFEST_FILE).read_text())
    (copy / MANIFEST_FILE).write_text(json.dumps({**data, "derivation": ["int8"]}))
    with pytest.raises(ModelDirectoryError, match="derivation must be an object or null"):
        load_manifest(copy)


def test_derived_from_current_notices_a_changed_fp32_manifest(tmp_path: Path, model_dir: Path) -> None:
    copy = Path(shutil.copytree(model_dir / "int8", tmp_path / "int8"))
    assert derived_from_current(copy, model_dir)
    other = _fp32_copy(tmp_path / "other")
    (other / MANIFEST_FILE).write_text((other / MANIFEST_FILE).read_text() + "\n")
    assert not derived_from_current(copy, other)


def test_test_split_needs_no_training_split() -> None:
    """read_test_split generates the test split without train: it must not depend on it."""
    small = {"seed": 7, "valid_size": 20, "test_size": 20, "heldout_size": 20}
    with_train = generate_corpus(CorpusConfig(train_size=200, **small))["test"]
    assert generate_corpus(CorpusConfig(train_size=0, **small))["test"] == with_train


def test_only_names_known_variants(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--model-dir", "x", "--only", "int8,int4"])
    assert "choose among int8,fp16,optimized" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Without torch: the Docker images' builder stage builds a variant in a venv that has no torch


# Run before anything else in a child interpreter: `import torch` (and torch.anything) then raises
# ImportError, as where torch is not installed, even though this venv has it.
_NO_TORCH = "import sys\nsys.modules['torch'] = None\n"


def _python_without_torch(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _NO_TORCH + code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_variant_modules_import_without_torch() -> None:
    code = (
        "import export.variants, export.variants.checks, export.variants.graphs\n"
        "loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] == 'torch')\n"
        "assert not loaded, loaded\n"
    )
    result = _python_without_torch(code)
    assert result.returncode == 0, result.stderr


def test_int8_builds_without_torch(tmp_path: Path) -> None:
    """What Dockerfile.cpu's builder runs: no torch, no data/ (the test split is generated)."""
    model_dir = _fp32_copy(tmp_path / "en-fr-small")
    args = ["--model-dir", str(model_dir), "--only", "int8", "--sentences", "4"]
    result = _python_without_torch(
        "from export.variants import main\nmain()", *args, "--corpus-dir", str(tmp_path / "no-corpus")
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in model_dir.iterdir() if p.is_dir()) == ["int8"]
    graphs = _load(model_dir, "int8")  # every checksum and signature
    assert graphs.manifest.variant == "int8" and derived_from_current(model_dir / "int8", model_dir)
    quality = graphs.manifest.quality
    assert quality is not None and quality["sentences"] == 4
    assert quality["bleu_drop"]["greedy"] <= checks.MAX_BLEU_DROP
