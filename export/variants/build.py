"""Derived variants of a model directory: int8 (CPU), fp16 (GPU), optimized fp32 (CPU).

    python -m export.variants --model-dir models/en-fr-small [--only int8,fp16,optimized] [--sentences N]

Each variant is a sub-directory of the model directory (docs/model-directory.md) holding its three
graphs (weights inline: derived weights are not the checkpoint's, so they cannot point into
model.safetensors), a copy of the tokenizer and its own manifest.json — variant, graph signatures,
sha256 of every file, `quality` and `derivation` (the fp32 manifest it came from, tool, options,
node counts, checks). Variants are made from the fp32 ONNX graphs alone — no checkpoint is read
and no PyTorch model runs — by `make setup`, and never committed. torch is not imported at all
(tests/export/test_variants.py checks): the Docker images' builder stage builds int8 (CPU image)
or fp16 (GPU image) with onnx, onnxruntime and sacrebleu only.

Checks (export.variants.checks), before the manifest is written:
    int8       BLEU / chrF / exact match, greedy and beam 4, next to fp32's on the same test
               sentences; BLEU may drop by at most 0.5. The first `--sentences` (default 200,
               what `make setup` measures; 0 = the whole split, what `make variants` measures).
    fp16       no GPU here: structure (float16 weights and signature, checked at load) and parity
               with fp32 on CPU, recorded; `gpu_parity_checked` is false.
    optimized  every output within 1e-4 of fp32 and greedy translations token-identical.
A variant that fails gets no manifest, so nothing can load it, and the command exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from export.model_config import TransformerConfig
from export.onnx.contract import graph_specs, in_place_step_spec
from export.variants import graphs as vg
from export.variants.checks import (
    OPTIMIZED_ATOL,
    VariantCheckError,
    cpu_parity,
    quality_against_fp32,
    read_test_split,
    require_finite,
    require_fp32_parity,
)
from export.variants.fused_step import build_fused_step
from service.engine.graphs import OnnxGraphs
from service.modeldir.manifest import (
    MANIFEST_FILE,
    GraphSpec,
    Manifest,
    ModelDirectoryError,
    Variant,
    checksums,
    sha256_file,
    write_manifest,
)
from service.modeldir.tokenizer import Tokenizer

VARIANTS = ("int8", "fp16", "optimized")  # sub-directory names, in build order
Split = Sequence[tuple[str, str]]  # (English, French) pairs of the test split


@dataclass(frozen=True)
class BuildOptions:
    sentences: int = 200  # test sentences for int8's quality figures; 0: the whole split
    parity_sentences: int = 200  # test sentences of the fp16 and optimized parity checks
    corpus_dir: Path = Path("data/corpus")  # test.tsv is read from here when it exists
    threads: int = 2  # onnxruntime intra-op threads of the checks


@dataclass(frozen=True)
class Source:
    """The fp32 model directory the variants are derived from."""

    model_dir: Path
    manifest_sha256: str  # of its manifest.json, which lists the sha256 of every fp32 file
    graphs: OnnxGraphs
    tokenizer: Tokenizer

    @property
    def manifest(self) -> Manifest:
        return self.graphs.manifest

    @classmethod
    def load(cls, model_dir: Path, threads: int) -> Source:
        graphs = OnnxGraphs(model_dir, intra_op_threads=threads)  # verifies every file
        if graphs.manifest.variant != "fp32":
            raise ModelDirectoryError(
                f"{model_dir}: variants derive from fp32 graphs, not {graphs.manifest.variant}"
            )
        return cls(
            model_dir=model_dir,
            manifest_sha256=sha256_file(model_dir / MANIFEST_FILE),
            graphs=graphs,
            tokenizer=Tokenizer.from_file(model_dir / graphs.manifest.tokenizer),
        )


def build_variants(
    model_dir: Path, only: Sequence[str] = VARIANTS, options: BuildOptions | None = None
) -> dict[str, Manifest]:
    """Build the variants named in `only` into `model_dir/<name>/`, each checked.

    Raises:
        ModelDirectoryError: `model_dir` is not a verified fp32 model directory.
        VariantCheckError: a variant failed its checks (it is left without a manifest).
    """
    options = options or BuildOptions()
    source = Source.load(model_dir, options.threads)
    split = read_test_split(options.corpus_dir)
    builders: dict[str, Callable[[Source, Split, BuildOptions], Manifest]] = {
        "int8": build_int8,
        "fp16": build_fp16,
        "optimized": build_optimized,
    }
    return {name: builders[name](source, split, options) for name in VARIANTS if name in only}


def build_int8(source: Source, split: Split, options: BuildOptions) -> Manifest:
    out, manifest = _write_variant(
        source,
        "int8",
        variant="int8",
        transform=vg.quantize_int8,
        step=lambda: vg.quantize_weight_blocks(build_fused_step(source.model_dir, source.manifest)),
        specs=_with_in_place_step(source),
        tool=(
            "encoder, attention: onnxruntime.quantization.quantize_dynamic, then "
            "export.variants.graphs.quantize_rows_apart; decoder_step: export.variants.fused_step, "
            "then export.variants.graphs.quantize_weight_blocks"
        ),
        options={
            **{k: getattr(v, "name", v) for k, v in vg.INT8_OPTIONS.items()},  # QuantType → its name
            "activations": "per row (last axis), symmetric: scale max|x|/127, uint8 zero point 128",
            "decoder_step": {
                "op": "MatMulNBits",
                "bits": 8,
                "block_size": vg.WEIGHT_BLOCK,
                "accuracy_level": vg.NBITS_ACCURACY_LEVEL,
            },
        },
    )
    with _no_manifest_on_failure(out):
        pairs = split[: options.sentences] if options.sentences else split
        quality = quality_against_fp32(
            "int8",
            OnnxGraphs(out, intra_op_threads=options.threads),
            source.graphs,
            source.tokenizer,
            pairs,
            whole_split=len(pairs) == len(split),
            threads=options.threads,
        )
    return _rewrite(out, manifest, quality=quality)


def build_fp16(source: Source, split: Split, options: BuildOptions) -> Manifest:
    cfg = TransformerConfig.from_dict(dict(source.manifest.architecture))
    out, manifest = _write_variant(
        source,
        "fp16",
        variant="fp16",
        transform=vg.convert_fp16,
        specs=graph_specs(cfg, "float16"),
        tool="onnxruntime.transformers.float16.convert_float_to_float16",
        options={
            "keep_io_types": list(vg.FP16_FLOAT32_OUTPUTS),
            "op_block_list": list(vg.FP16_BLOCKED_OPS),
        },
    )
    with _no_manifest_on_failure(out):
        # Loading checks each graph's signature (float16 but log_probs) against the manifest's.
        graphs = OnnxGraphs(out, intra_op_threads=options.threads)
        parity = cpu_parity(source.graphs, graphs, source.tokenizer, split[: options.parity_sentences])
        require_finite("fp16", parity)
        checks = {
            "gpu_parity_checked": False,  # built where there is no GPU: only CPU results are known
            "cpu_parity": parity,
        }
    return _rewrite(out, manifest, derivation={**(manifest.derivation or {}), "checks": checks})


def build_optimized(source: Source, split: Split, options: BuildOptions) -> Manifest:
    out, manifest = _write_variant(
        source,
        "optimized",
        variant="fp32",  # numerically: the same float types, the same results within 1e-4
        transform=vg.optimize,
        step=lambda: vg.optimize(build_fused_step(source.model_dir, source.manifest)),
        specs=_with_in_place_step(source),
        tool=(
            "onnxruntime SessionOptions.optimized_model_filepath; decoder_step: "
            "export.variants.fused_step first"
        ),
        options={
            "graph_optimization_level": "ORT_ENABLE_EXTENDED",
            "execution_provider": vg.OPTIMIZED_PROVIDER,
        },
    )
    with _no_manifest_on_failure(out):
        graphs = OnnxGraphs(out, intra_op_threads=options.threads)
        parity = cpu_parity(source.graphs, graphs, source.tokenizer, split[: options.parity_sentences])
        require_fp32_parity("optimized", parity)
        checks = {"atol": OPTIMIZED_ATOL, "cpu_parity": parity}
    return _rewrite(out, manifest, derivation={**(manifest.derivation or {}), "checks": checks})


def _with_in_place_step(source: Source) -> dict[str, GraphSpec]:
    """The fp32 graphs' signatures, with the fused step's in-place contract for the decoder step."""
    cfg = TransformerConfig.from_dict(dict(source.manifest.architecture))
    return {**source.manifest.graphs, "decoder_step": in_place_step_spec(cfg)}


# ---------------------------------------------------------------------------------------------
# Writing a variant directory


def _write_variant(
    source: Source,
    name: str,
    *,
    variant: Variant,
    transform: Callable[[onnx.ModelProto], onnx.ModelProto],
    step: Callable[[], onnx.ModelProto] | None = None,
    specs: Mapping[str, GraphSpec],
    tool: str,
    options: dict[str, Any],
) -> tuple[Path, Manifest]:
    """Transform every fp32 graph into `model_dir/name/` (replacing what was there), copy the
    tokenizer and write the manifest, with no quality and no checks yet. `step`, when given,
    makes the decoder step instead (`export.variants.fused_step`: rebuilt, not transformed)."""
    out = source.model_dir / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    changes = {}
    for graph, spec in source.manifest.graphs.items():
        prepared = vg.prepare(source.model_dir / spec.file)
        before = vg.op_counts(prepared)  # first: a transform may edit its input in place
        model = step() if step is not None and graph == "decoder_step" else transform(prepared)
        changes[graph] = {
            **vg.op_changes(before, vg.op_counts(model)),
            "initializers": vg.initializer_types(model),
        }
        onnx.save(model, str(out / specs[graph].file))  # weights inline: a few MB, far from 2 GB
    tokenizer_files = Tokenizer.from_file(source.model_dir / source.manifest.tokenizer).files
    for file in tokenizer_files:
        shutil.copyfile(source.model_dir / file, out / file)
    derivation = {
        "from": {"variant": source.manifest.variant, "manifest_sha256": source.manifest_sha256},
        "tool": tool,
        "options": options,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        # Node counts of each fp32 graph after onnxruntime's basic optimisation (what `prepare`
        # hands over, and what onnxruntime would run anyway) → of the variant's graph; the
        # variant's initializers by element type.
        "graphs": changes,
    }
    manifest = dataclasses.replace(
        source.manifest,
        variant=variant,
        graphs=dict(specs),
        files=checksums(out, [*(s.file for s in specs.values()), *tokenizer_files]),
        quality=None,
        derivation=derivation,
    )
    write_manifest(out, manifest)
    return out, manifest


def _rewrite(out: Path, manifest: Manifest, **changes: Any) -> Manifest:
    manifest = dataclasses.replace(manifest, **changes)
    write_manifest(out, manifest)
    return manifest


@contextmanager
def _no_manifest_on_failure(out: Path) -> Iterator[None]:
    """A variant that fails a check must not stay loadable: its manifest goes."""
    try:
        yield
    except BaseException:
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Command line


def _parse_only(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose among {','.join(VARIANTS)}")
    return names


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.variants", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="an fp32 model directory (make export)")
    parser.add_argument("--only", type=_parse_only, default=list(VARIANTS), help="comma-separated variants")
    parser.add_argument(
        "--sentences",
        type=int,
        default=BuildOptions.sentences,
        help="test sentences for int8 quality; 0: all",
    )
    parser.add_argument("--corpus-dir", type=Path, default=BuildOptions.corpus_dir)
    parser.add_argument("--threads", type=int, default=BuildOptions.threads)
    args = parser.parse_args(argv)
    options = BuildOptions(sentences=args.sentences, corpus_dir=args.corpus_dir, threads=args.threads)
    start = time.perf_counter()
    try:
        manifests = build_variants(args.model_dir, args.only, options)
    except (ModelDirectoryError, VariantCheckError) as err:
        sys.exit(f"python -m export.variants: {err}")
    for name, manifest in manifests.items():
        size = sum(f.stat().st_size for f in (args.model_dir / name).iterdir())
        print(f"{args.model_dir / name}: {manifest.variant}, {size / 1e6:.1f} MB{_summary(manifest)}")
    print(f"variants built in {time.perf_counter() - start:.1f} s")


def _summary(manifest: Manifest) -> str:
    """The figures that matter, on one line."""
    quality, checks = manifest.quality, (manifest.derivation or {}).get("checks", {})
    if quality:
        figures = "; ".join(
            f"{d} BLEU {quality[manifest.variant][d]['bleu']} (fp32 {quality['fp32'][d]['bleu']})"
            for d in quality["bleu_drop"]
        )
        return f"; {figures} on {quality['sentences']} {quality['split']} sentences"
    if "cpu_parity" in checks:
        parity = checks["cpu_parity"]["sentences"]
        return (
            f"; max |Δ log p| vs fp32 {parity['max_abs_log_prob_diff']:.1e}, greedy identical "
            f"{100 * parity['greedy_identical']:.1f}% of {parity['sentences']} sentences"
        )
    return ""
