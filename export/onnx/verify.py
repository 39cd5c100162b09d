"""Verify an exported model directory against its PyTorch checkpoint: nothing lost on the way.

    python -m export.onnx.verify [--model-dir models/en-fr-small] [--sentences N]   (make verify)

Checks, each printed with its figure; the exit status is 1 if any fails:
  manifest    every file's sha256 matches the manifest, and a tampered copy is refused;
  parity      onnxruntime (CPU) vs PyTorch, max abs difference ≤ 1e-4 on random padded batches,
              for every output of every graph (first step with an empty cache, and a later one);
  cache       N cached decoder steps, each writing its K/V into a pre-allocated cache buffer,
              equal one teacher-forced pass over the same prefix;
  greedy/beam the KV-cached ONNX decoder gives exactly the tokens of the PyTorch reference
              (full recomputation, no cache) for every test sentence, greedy and beam 4;
  staggered   a sentence decoded alone equals it decoded while others join the running batch
              at later steps with shorter pasts, greedy and beam 4;
  fresh       the directory equals what a fresh export of its weights produces: graphs, weights,
              tokenizer and manifest; the versions of the tools that wrote it are reported only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from export.checkpoint import TOKENIZER_FILE, load_model
from export.corpus import CorpusConfig, generate_corpus, read_pairs
from export.data import pad
from export.generate import beam_search, greedy_decode
from export.model import Transformer, padding_mask
from export.onnx.contract import VERIFY_SIZES, graph_specs
from export.onnx.directory import export_model_directory
from export.onnx.export import graph_differences
from export.translate import DEFAULT_MODEL_DIR
from service.decoding import default_max_output_tokens
from service.engine.graphs import OnnxGraphs
from service.engine.reference_decoder import translate_ids, translate_ids_staggered
from service.modeldir.manifest import MANIFEST_FILE, ModelDirectoryError, load_manifest
from service.modeldir.tokenizer import Tokenizer

ATOL = 1e-4
BATCH = 64


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def check_manifest(model_dir: Path) -> Check:
    manifest = load_manifest(model_dir)  # raises, naming the file, on any mismatch
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / model_dir.name
        shutil.copytree(model_dir, copy)
        with (copy / TOKENIZER_FILE).open("ab") as f:
            f.write(b" ")
        try:
            load_manifest(copy)
            refused = "a tampered tokenizer.json was NOT refused"
        except ModelDirectoryError as err:
            refused = f"tampered copy refused: {err}"
    ok = refused.startswith("tampered copy refused") and TOKENIZER_FILE in refused
    return Check("manifest", ok, f"{len(manifest.files)} files verified; {refused}")


def check_parity(model: Transformer, model_dir: Path) -> Check:
    worst: dict[str, float] = {}
    for name, spec in graph_specs(model.cfg).items():
        for sizes in (VERIFY_SIZES, {"batch": 5, "src_len": 11, "tgt_len": 9, "cache_len": 6}):
            for output, diff in graph_differences(model, name, spec, model_dir / spec.file, sizes).items():
                key = f"{name}.{output}"
                worst[key] = max(worst.get(key, 0.0), diff)
    top = max(worst.values())
    detail = f"max |onnx - torch| {top:.1e} over {len(worst)} outputs (limit {ATOL:.0e})"
    return Check("parity", top <= ATOL, detail)


def check_cache(model: Transformer, graphs: OnnxGraphs, sources: list[list[int]]) -> Check:
    """Feed the reference's own greedy outputs step by step through the cache and compare each
    step's log-probs with one teacher-forced pass over the whole prefix.

    The cache is a buffer allocated once with a slot per step, as a server keeps it: every step
    sees all its slots, the free ones masked, and its new K/V are written into the step's slot.
    """
    cfg = model.cfg
    src = pad(sources, cfg.pad_id)
    targets = [h.tokens for h in greedy_decode(model, src, 40)]
    tgt = pad([[cfg.bos_id, *t] for t in targets], cfg.pad_id)  # (B, T)
    with torch.no_grad():
        src_mask = padding_mask(src, cfg.pad_id)
        memory = model.encode(src, src_mask)
        full = torch.log_softmax(
            model.logits(model.decode(memory, src_mask, tgt, model.target_mask(tgt))), -1
        )
    src_ids = src.numpy()
    encoded = graphs.encode(src_ids, src_ids != cfg.pad_id)
    tgt_ids = tgt.numpy()
    batch, steps = tgt_ids.shape
    dims = graphs.dims
    past_k: np.ndarray = np.zeros(
        (dims.decoder_layers, batch, dims.heads, steps, dims.head_dim), graphs.float_dtype
    )
    past_v = np.zeros_like(past_k)
    self_mask = np.zeros((batch, steps), dtype=bool)
    worst = 0.0
    for step in range(steps):
        out = graphs.step(
            tgt_ids[:, step : step + 1],
            np.full(batch, step, np.int64),
            past_k,
            past_v,
            self_mask,
            encoded.cross_k,
            encoded.cross_v,
            src_ids != cfg.pad_id,
        )
        past_k[:, :, :, step] = out.new_k
        past_v[:, :, :, step] = out.new_v
        real = tgt_ids[:, step] != cfg.pad_id  # rows whose prefix is still running
        self_mask[:, step] = real
        worst = max(worst, float(np.abs(out.log_probs[real] - full[real, step].numpy()).max()))
    detail = f"{steps} cached steps vs one full pass: max diff {worst:.1e}"
    return Check("cache", worst <= ATOL, detail)


def check_decoding(model: Transformer, graphs: OnnxGraphs, sources: list[list[int]], beam_size: int) -> Check:
    mismatches, worst = 0, 0.0
    for start in range(0, len(sources), BATCH):
        chunk = sources[start : start + BATCH]
        limits = [default_max_output_tokens(len(s), model.cfg.max_positions) for s in chunk]
        src = pad(chunk, model.cfg.pad_id)
        if beam_size == 1:
            reference = greedy_decode(model, src, limits)
        else:
            reference = [hyps[0] for hyps in beam_search(model, src, limits, beam_size=beam_size)]
        got = [hyps[0] for hyps in translate_ids(graphs, chunk, beam_size=beam_size)]
        for r, g in zip(reference, got, strict=True):
            mismatches += list(r.tokens) != list(g.tokens)
            worst = max(worst, abs(r.score - g.score))
    name = "greedy" if beam_size == 1 else f"beam{beam_size}"
    detail = (
        f"{len(sources) - mismatches}/{len(sources)} token-identical to PyTorch; max score diff {worst:.1e}"
    )
    return Check(name, mismatches == 0, detail)


def check_staggered(graphs: OnnxGraphs, sources: list[list[int]], beam_size: int) -> Check:
    """Sentences of mixed lengths arriving at steps 0, 0, 1, 3, 5, …; each must decode as if alone."""
    arrivals = [0, 0, *range(1, 2 * len(sources), 2)][: len(sources)]
    together = translate_ids_staggered(graphs, sources, arrivals, beam_size=beam_size, n_best=beam_size)
    alone = [translate_ids(graphs, [s], beam_size=beam_size, n_best=beam_size)[0] for s in sources]
    same = sum(
        [h.tokens for h in t] == [h.tokens for h in a]
        and all(abs(x.score - y.score) <= ATOL for x, y in zip(t, a, strict=True))
        for t, a in zip(together, alone, strict=True)
    )
    detail = f"beam {beam_size}: {same}/{len(sources)} equal to decoding alone (arrivals {arrivals[:6]}…)"
    return Check(f"staggered{beam_size}", same == len(sources), detail)


def _graph_contents(path: Path) -> onnx.ModelProto:
    """A graph file as what it computes: without the name and version of the program that wrote it."""
    model = onnx.load(path, load_external_data=False)  # initializers stay references into the weights
    model.producer_name = model.producer_version = ""
    return model


def _graph_change(committed: onnx.ModelProto, fresh: onnx.ModelProto) -> str:
    """Which parts of a graph differ, for the check's message."""
    a, b = committed.graph, fresh.graph
    parts = [
        f"{what} ({len(x)} → {len(y)})"
        for what, x, y in (
            ("nodes", a.node, b.node),
            ("initializers", a.initializer, b.initializer),
            ("inputs", a.input, b.input),
            ("outputs", a.output, b.output),
        )
        if [p.SerializeToString(deterministic=True) for p in x]
        != [p.SerializeToString(deterministic=True) for p in y]
    ]
    return "changed " + (", ".join(parts) if parts else "model metadata (opset, IR version, attributes)")


@dataclass(frozen=True)
class ExportComparison:
    differences: list[str]  # what a fresh export changed: graphs, weights, tokenizer, the manifest's contract
    notes: list[str]  # what differs without changing the model: the versions of the tools that wrote it


def compare_exports(committed: Path, fresh: Path) -> ExportComparison:
    """Compare a committed model directory with a fresh export of its checkpoint.

    Graphs are compared as ONNX models with the producer's name and version left out; the manifest
    as JSON without `exporter` (the torch/onnx/onnxruntime versions that wrote it), and without the
    checksum of a graph file whose only difference is its producer. Everything else counts: every
    node, initializer (inline values and references into the weights), signature and opset, every
    other checksum (weights, tokenizer), the limits, special ids and architecture.
    """
    old = json.loads((committed / MANIFEST_FILE).read_text(encoding="utf-8"))
    new = json.loads((fresh / MANIFEST_FILE).read_text(encoding="utf-8"))
    differences, notes = [], []
    for graph in sorted({spec["file"] for spec in old["graphs"].values()}):
        if (committed / graph).read_bytes() == (fresh / graph).read_bytes():
            continue
        a, b = _graph_contents(committed / graph), _graph_contents(fresh / graph)
        if a.SerializeToString(deterministic=True) != b.SerializeToString(deterministic=True):
            differences.append(f"{graph} {_graph_change(a, b)}")
            continue
        old["files"].pop(graph, None)
        new["files"].pop(graph, None)
        notes.append(f"{graph}: the same graph, written by another producer version")
    old_tools, new_tools = old.pop("exporter", None) or {}, new.pop("exporter", None) or {}
    tools = [
        f"{k} {old_tools.get(k)} → {new_tools.get(k)}"
        for k in sorted(old_tools.keys() | new_tools.keys())
        if old_tools.get(k) != new_tools.get(k)
    ]
    if tools:
        notes.append(f"exported with other tools (recorded, not compared): {', '.join(tools)}")
    for key in sorted(old.keys() | new.keys()):
        if key == "files":
            differences += [
                f"{MANIFEST_FILE}: files[{name}]"
                for name in sorted(old["files"].keys() | new["files"].keys())
                if old["files"].get(name) != new["files"].get(name)
            ]
        elif old.get(key) != new.get(key):
            differences.append(f"{MANIFEST_FILE}: {key}")
    return ExportComparison(differences, notes)


def check_fresh_export(model_dir: Path) -> Check:
    """The committed directory is what `make export` makes of its checkpoint today."""
    manifest = load_manifest(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "fresh"
        export_model_directory(model_dir, fresh, name=manifest.name, version=manifest.version)
        comparison = compare_exports(model_dir, fresh)
    if comparison.differences:
        detail = f"differ: {'; '.join(comparison.differences)} (stale: run make export)"
    else:
        detail = "graphs, weights, tokenizer and manifest as a fresh export makes them"
    detail += "".join(f"; {note}" for note in comparison.notes)
    return Check("fresh", not comparison.differences, detail)


def load_test_sources(tokenizer: Tokenizer, corpus_dir: Path, limit: int, max_tokens: int) -> list[list[int]]:
    path = corpus_dir / "test.tsv"
    pairs = (
        read_pairs(path)
        if path.is_file()
        else [(p.en, p.fr) for p in generate_corpus(CorpusConfig())["test"]]
    )
    return [tokenizer.encode_source(en, max_tokens) for en, _ in pairs[: limit or None]]


def run_checks(model_dir: Path, corpus_dir: Path, sentences: int = 0) -> list[Check]:
    """Every check, in order; `sentences` limits the test sentences decoded (0: all)."""
    model = load_model(model_dir)
    graphs = OnnxGraphs(model_dir)
    tokenizer = Tokenizer.from_file(model_dir / TOKENIZER_FILE)
    sources = load_test_sources(tokenizer, corpus_dir, sentences, model.cfg.max_positions)
    mixed = sorted(sources[:40], key=len)[::5]  # short and long neighbours
    steps: Sequence[Callable[[], Check]] = (
        lambda: check_manifest(model_dir),
        lambda: check_parity(model, model_dir),
        lambda: check_cache(model, graphs, mixed),
        lambda: check_decoding(model, graphs, sources, 1),
        lambda: check_decoding(model, graphs, sources, 4),
        lambda: check_staggered(graphs, mixed, 1),
        lambda: check_staggered(graphs, mixed, 4),
        lambda: check_fresh_export(model_dir),
    )
    results = []
    for step in steps:
        check = step()
        print(f"{'ok  ' if check.passed else 'FAIL'} {check.name:11} {check.detail}", flush=True)
        results.append(check)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Verify an exported model directory against PyTorch.")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--corpus-dir", type=Path, default=Path("data/corpus"))
    parser.add_argument("--sentences", type=int, default=0, help="test sentences to decode (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checks = run_checks(args.model_dir, args.corpus_dir, args.sentences)
    failed = [c.name for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
