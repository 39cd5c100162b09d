"""This engine against CTranslate2 and Transformers on the same weights: `python -m bench.peers`.

`make bench-peers` runs it with the defaults. Every system decodes the same source ids with the same
weights, converted from one MarianMT checkpoint:

- the default model, written out losslessly as a Marian checkpoint (`export.to_marian`);
- a transformer-base-sized Marian (d_model 512, 6+6 layers, 8 heads, FFN 2048, 32,000 entries) with
  random weights, built as `bench.import_hf` builds it and imported with `export.import_hf`; random
  weights never end a sentence, so every system decodes exactly 32 tokens per sentence.

Systems: this engine at library level (`service.engine.reference_decoder.translate_ids` over the
model's onnxruntime graphs, int8 and fp32), CTranslate2 (int8 and float32, loaded by
`FaithfulMarianLoader`) and Transformers `generate` with its KV cache. Each system runs in settings
(threads per run × batches decoded at once, the latter as CTranslate2's inter_threads); the pool is
cut into batches in corpus order, the same batches for everyone. Per model, strategy (greedy, beam
4) and batch size, one untimed pass per setting gives its outputs (compared token for token with this
engine's fp32 ones), then rounds in which the settings take turns in rotated order; the median
counts. A ratio is this engine's best setting over CTranslate2's best, in the same cell.

Then, per system, its peak resident memory in a fresh process decoding the pool at batch 64, and the
full service (`python -m service`, its default variant) under a closed gRPC loop of calls carrying 8
texts each, against the engine at batch 8.

Writes docs/peers.md (the tables and the machine), bench/results/peers-<machine>.json and
docs/peers.png (tokens/s against batch size). A measurement, never a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import export.variants
from bench.cli import add_out, benchmark_parser
from bench.import_hf import Size, build_checkpoint
from bench.inputs import load_texts
from bench.load_client import run_phase
from bench.processes import service_argv, serving_process
from bench.report import (
    INTERPRETATION_BEGIN,
    INTERPRETATION_END,
    Machine,
    describe_machine,
    kept_interpretation,
)
from service.engine.graphs import OnnxGraphs
from service.engine.reference_decoder import translate_ids
from service.modeldir.manifest import load_manifest
from service.modeldir.tokenizer import Tokenizer

DEFAULT_OUT = Path("docs/peers.md")
RESULTS_DIR = Path("bench/results")
BATCHES = (1, 8, 32, 64)
BEAMS = (1, 4)
SERVICE_TEXTS_PER_CALL = 8
MEMORY_BATCH = 64
BASE_OUTPUT_TOKENS = 32  # per sentence, the base model (random weights: it never ends sooner)


# --- the models -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerModel:
    """One model in every system's format."""

    name: str  # "default" or "base"
    model_dir: Path  # this project's model directory (fp32; int8/ inside)
    checkpoint: Path  # the MarianMT checkpoint every peer reads
    ct2_dir: Path  # the checkpoint converted for CTranslate2 (float32; int8 at load)
    max_output_tokens: int  # every system's limit, the end token included
    description: str


@contextlib.contextmanager
def faithful_marian_loader() -> Iterator[None]:
    """CTranslate2's converter with `FaithfulMarianLoader` for MarianConfig, the stock one back after."""
    import ctranslate2.converters.transformers as ct2_transformers

    loaders = ct2_transformers._MODEL_LOADERS
    stock = loaders["MarianConfig"]
    loaders["MarianConfig"] = _faithful_loader_class()()
    try:
        yield
    finally:
        loaders["MarianConfig"] = stock


def _faithful_loader_class() -> type:
    """The Marian loader that keeps the checkpoint as Transformers runs it.

    CTranslate2's stock one assumes OPUS-MT's conventions: it drops the vocabulary's last entry (the
    pad token OPUS-MT appends) and starts the decoder from a zero vector. Transformers starts from
    the embedding of `decoder_start_token_id` and keeps every entry; so does this one (Bart's
    spec, vocabulary and start token with Marian's post-norm settings), which on an OPUS-MT
    checkpoint, whose pad row is zero, decodes the same as the stock loader.
    """
    from ctranslate2.converters.transformers import BartLoader, MarianMTLoader

    class FaithfulMarianLoader(MarianMTLoader):
        def get_model_spec(self, model: Any) -> Any:
            model.config.normalize_before = False
            model.config.normalize_embedding = False
            return BartLoader.get_model_spec(self, model)

        def set_config(self, config: Any, model: Any, tokenizer: Any) -> None:
            super().set_config(config, model, tokenizer)  # end and unknown tokens
            start = model.config.decoder_start_token_id
            config.decoder_start_token = tokenizer.convert_ids_to_tokens(start)
            if tokenizer.bos_token is not None:  # OPUS-MT's tokenizers have none
                config.bos_token = tokenizer.bos_token

        def set_decoder(self, spec: Any, decoder: Any) -> None:
            BartLoader.set_decoder(self, spec, decoder)

        def get_vocabulary(self, model: Any, tokenizer: Any) -> Any:
            return BartLoader.get_vocabulary(self, model, tokenizer)

    return FaithfulMarianLoader


def convert_for_ct2(checkpoint: Path, out: Path) -> Path:
    """The checkpoint as a CTranslate2 model directory (float32 weights)."""
    import ctranslate2

    with faithful_marian_loader():
        ctranslate2.converters.TransformersConverter(str(checkpoint)).convert(str(out), force=True)
    return out


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdout=sys.stderr)


def prepare_default(model_dir: Path, work: Path) -> PeerModel:
    """The committed model (its int8 variant must be built: make setup) and its Marian twin."""
    checkpoint = work / "default-marian"
    if not (checkpoint / "config.json").is_file():
        _run(
            [
                sys.executable,
                "-m",
                "export.to_marian",
                "--model-dir",
                str(model_dir),
                "--out",
                str(checkpoint),
            ]
        )
    ct2 = work / "default-ct2"
    if not (ct2 / "model.bin").is_file():
        convert_for_ct2(checkpoint, ct2)
    manifest = load_manifest(model_dir)
    arch = manifest.architecture
    return PeerModel(
        "default",
        model_dir,
        checkpoint,
        ct2,
        max_output_tokens=manifest.architecture["max_positions"] - 2,
        description=(
            f"the committed model `{model_dir}` (d_model {arch['d_model']}, {arch['n_encoder_layers']}+"
            f"{arch['n_decoder_layers']} layers, {arch['n_heads']} heads, FFN {arch['d_ff']}, vocabulary "
            f"{arch['vocab_size']:,}), trained"
        ),
    )


def prepare_base(work: Path, size: Size) -> PeerModel:
    """A random base-sized Marian checkpoint, imported (fp32 and int8) and converted.

    Random weights never rank the end token first (its margin is largest at the first step, so no
    bias makes lengths vary): every system decodes exactly BASE_OUTPUT_TOKENS tokens per sentence,
    with no end token imposed at the limit (forced_eos off), the fixed-length measurement of
    ../shared/NOTES.md."""
    checkpoint, model_dir, ct2 = work / "base-marian", work / "base-model", work / "base-ct2"
    if not (checkpoint / "config.json").is_file():
        build_checkpoint(checkpoint, size, corpus_pairs=20_000, forced_eos=False)
    if not (model_dir / "manifest.json").is_file():
        _run([sys.executable, "-m", "export.import_hf", str(checkpoint), "--out", str(model_dir)])
    if not _built_by_current_code(model_dir / "int8" / "manifest.json"):
        variants = [sys.executable, "-m", "export.variants", "--model-dir", str(model_dir)]
        _run([*variants, "--only", "int8", "--sentences", "50"])
    if not (ct2 / "model.bin").is_file():
        convert_for_ct2(checkpoint, ct2)
    return PeerModel(
        "base",
        model_dir,
        checkpoint,
        ct2,
        max_output_tokens=BASE_OUTPUT_TOKENS,
        description=(
            f"a transformer-base-sized MarianMT (d_model {size.d_model}, {size.layers}+{size.layers} "
            f"layers, {size.heads} heads, FFN {size.ffn}, vocabulary {size.vocab:,}), random weights: "
            f"every sentence decodes exactly {BASE_OUTPUT_TOKENS} tokens"
        ),
    )


def _built_by_current_code(manifest: Path) -> bool:
    """A variant's manifest newer than the code that builds variants (as `make setup` judges)."""
    code = Path(export.variants.__file__).parent.glob("*.py")
    return manifest.is_file() and manifest.stat().st_mtime > max(f.stat().st_mtime for f in code)


# --- the systems ----------------------------------------------------------------------------------

Decode = Callable[[Sequence[Sequence[int]], int], list[list[int]]]  # a batch of sources, beam → outputs


@dataclass(frozen=True)
class Setting:
    """A system in one setting: what it is and how to build it (picklable, for the memory phase)."""

    system: str  # engine-int8, engine-fp32, ct2-int8, ct2-float32, transformers
    threads: int  # intra-op threads of one run
    callers: int  # batches decoded at once (CTranslate2's inter_threads)

    @property
    def name(self) -> str:
        return f"{self.system} {self.threads}t×{self.callers}"

    @property
    def family(self) -> str:
        return self.system.split("-")[0]


def parse_setting(text: str) -> Setting:
    """`engine-int8:1x2` → Setting("engine-int8", threads=1, callers=2)."""
    system, _, shape = text.partition(":")
    threads, _, callers = (shape or "1x1").partition("x")
    return Setting(system, int(threads), int(callers or 1))


DEFAULT_SETTINGS = (
    "engine-int8:1x1",
    "engine-int8:1x2",
    "engine-fp32:1x2",
    "ct2-int8:1x1",
    "ct2-int8:1x2",
    "ct2-float32:1x2",
    "transformers:1x1",
)
TRANSFORMERS_MIN_BATCH = (
    8  # Transformers is 5–50× slower: its batch-1 cells alone would take longer than the rest
)


def build(setting: Setting, model: PeerModel) -> Decode:
    """A function decoding one batch of source ids (each ending with the end token) in `setting`."""
    if setting.system.startswith("engine-"):
        variant = setting.system.removeprefix("engine-")
        directory = model.model_dir if variant == "fp32" else model.model_dir / variant
        graphs = OnnxGraphs(directory, intra_op_threads=setting.threads)

        def engine(batch: Sequence[Sequence[int]], beam: int) -> list[list[int]]:
            hyps = translate_ids(graphs, batch, beam_size=beam, max_output_tokens=model.max_output_tokens)
            return [list(h[0].tokens) for h in hyps]

        return engine
    if setting.system.startswith("ct2-"):
        return _ct2(setting, model)
    if setting.system == "transformers":
        return _transformers(setting, model)
    raise ValueError(f"unknown system {setting.system!r}")


def _ct2(setting: Setting, model: PeerModel) -> Decode:
    import ctranslate2

    translator = ctranslate2.Translator(
        str(model.ct2_dir),
        device="cpu",
        compute_type=setting.system.removeprefix("ct2-"),
        intra_threads=setting.threads,
        inter_threads=setting.callers,
    )
    vocabulary = _ct2_vocabulary(model.ct2_dir)
    ids = {token: i for i, token in enumerate(vocabulary)}
    manifest = load_manifest(model.model_dir)
    special = manifest.special_ids
    never = manifest.never_ids or (special.pad, special.bos)
    suppressed = [[vocabulary[i]] for i in never]

    def ct2(batch: Sequence[Sequence[int]], beam: int) -> list[list[int]]:
        sources = [[vocabulary[i] for i in source] for source in batch]
        results = translator.translate_batch(
            sources,
            beam_size=beam,
            max_batch_size=len(sources),
            max_decoding_length=model.max_output_tokens,
            suppress_sequences=suppressed,
        )
        return [[ids[token] for token in result.hypotheses[0]] for result in results]

    return ct2


def _ct2_vocabulary(ct2_dir: Path) -> list[str]:
    for name in ("shared_vocabulary.json", "target_vocabulary.json"):
        if (ct2_dir / name).is_file():
            return list(json.loads((ct2_dir / name).read_text(encoding="utf-8")))
    raise FileNotFoundError(f"{ct2_dir}: no vocabulary file")


def _transformers(setting: Setting, model: PeerModel) -> Decode:
    import torch
    from transformers import MarianMTModel

    torch.set_num_threads(setting.threads)
    marian = MarianMTModel.from_pretrained(str(model.checkpoint)).eval()
    config = marian.config
    pad, eos = config.pad_token_id, config.eos_token_id

    def transformers(batch: Sequence[Sequence[int]], beam: int) -> list[list[int]]:
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, source in enumerate(batch):
            ids[row, : len(source)] = torch.tensor(source)
            mask[row, : len(source)] = 1
        beam_flags = {"early_stopping": True} if beam > 1 else {}
        with torch.inference_mode():
            out = marian.generate(
                input_ids=ids,
                attention_mask=mask,
                num_beams=beam,
                do_sample=False,
                max_new_tokens=model.max_output_tokens,
                max_length=None,
                **beam_flags,
            )
        outputs = []
        for sequence in out[:, 1:].tolist():
            outputs.append(sequence[: sequence.index(eos)] if eos in sequence else sequence)
        return outputs

    return transformers


# --- measuring ------------------------------------------------------------------------------------


def decode_pool(
    decode: Decode, sources: Sequence[Sequence[int]], batch: int, beam: int, pool: ThreadPoolExecutor
) -> list[list[int]]:
    """The pool in batches of `batch` (corpus order), by the pool's threads at once."""
    chunks = [sources[i : i + batch] for i in range(0, len(sources), batch)]
    return [out for outs in pool.map(lambda chunk: decode(chunk, beam), chunks) for out in outs]


@dataclass(frozen=True)
class CellResult:
    """One setting at one model, strategy and batch size."""

    model: str
    setting: str
    system: str
    threads: int
    callers: int
    beam: int
    batch: int
    sentences: int
    output_tokens: int  # generated tokens with one end token per sentence
    seconds: float  # median wall time of decoding the pool
    seconds_per_round: list[float]
    tokens_per_s: float
    batch_ms: float  # wall time of one batch: seconds × callers / batches
    agreement: float  # fraction of sentences whose tokens equal the reference setting's


def measure_cells(
    model: PeerModel,
    settings: Sequence[Setting],
    sources: Sequence[Sequence[int]],
    batches: Sequence[int],
    beams: Sequence[int],
    rounds: int,
    log: Callable[[str], None],
) -> list[CellResult]:
    """Every setting × beam × batch: an untimed pass (the outputs), then `rounds` timed ones in
    which the settings take turns, order rotated each round."""
    decoders = {s: build(s, model) for s in settings}
    pools = {s: ThreadPoolExecutor(s.callers) for s in settings}
    reference = settings[0]
    results = []
    try:
        for beam in beams:
            for batch in batches:
                cell = [s for s in settings if s.family != "transformers" or batch >= TRANSFORMERS_MIN_BATCH]
                outputs = {s: decode_pool(decoders[s], sources, batch, beam, pools[s]) for s in cell}
                times: dict[Setting, list[float]] = {s: [] for s in cell}
                for r in range(rounds):
                    shift = r % len(cell)
                    for s in (*cell[shift:], *cell[:shift]):
                        start = time.perf_counter()
                        decode_pool(decoders[s], sources, batch, beam, pools[s])
                        times[s].append(time.perf_counter() - start)
                for s in cell:
                    seconds = statistics.median(times[s])
                    # the end token counts where a sentence ended before the limit
                    tokens = sum(len(o) + (len(o) < model.max_output_tokens) for o in outputs[s])
                    same = sum(a == b for a, b in zip(outputs[s], outputs[reference], strict=True))
                    batches_run = math.ceil(len(sources) / batch)
                    results.append(
                        CellResult(
                            model.name,
                            s.name,
                            s.system,
                            s.threads,
                            s.callers,
                            beam,
                            batch,
                            len(sources),
                            tokens,
                            seconds,
                            times[s],
                            tokens / seconds,
                            1000 * seconds * s.callers / batches_run,
                            same / len(sources),
                        )
                    )
                    log(f"{model.name} beam {beam} batch {batch}: {s.name} {tokens / seconds:,.0f} tok/s")
    finally:
        for pool in pools.values():
            pool.shutdown()
    return results


@dataclass(frozen=True)
class MemoryResult:
    model: str
    setting: str
    peak_mb: float  # the process's peak resident memory (VmHWM), imports included
    loaded_mb: float  # resident after loading, before decoding
    baseline_mb: float  # resident after the imports, before loading


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now; VmHWM: its
    peak, which a spawned process does not inherit, unlike ru_maxrss across its exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_of(setting: Setting, model: PeerModel, sources: Sequence[Sequence[int]]) -> MemoryResult:
    """In a fresh process (spawned): load `setting`, decode the pool greedily at MEMORY_BATCH."""
    if setting.system == "transformers":
        import torch  # noqa: F401  the baseline includes what the system imports
    else:
        import ctranslate2  # noqa: F401
    baseline = _status_mb("VmRSS")
    decode = build(setting, model)
    loaded = _status_mb("VmRSS")
    with ThreadPoolExecutor(setting.callers) as pool:
        decode_pool(decode, sources, MEMORY_BATCH, 1, pool)
    return MemoryResult(model.name, setting.name, _status_mb("VmHWM"), loaded, baseline)


def measure_memory(
    model: PeerModel, settings: Sequence[Setting], sources: Sequence[Sequence[int]]
) -> list[MemoryResult]:
    context = multiprocessing.get_context("spawn")
    results = []
    for setting in settings:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            results.append(pool.submit(memory_of, setting, model, sources).result())
    return results


@dataclass(frozen=True)
class ServiceResult:
    model: str
    variant: str  # the service's default on this machine
    clients: int
    texts_per_call: int
    seconds: float
    output_tokens_per_s: float
    calls: int
    errors: int


async def measure_service(
    model: PeerModel, texts: Sequence[str], clients: int, duration_s: float
) -> ServiceResult:
    """`python -m service` on the model, warmed, then a closed loop of calls of 8 texts each."""
    argv = service_argv("--model-dirs", str(model.model_dir), "--log-level", "WARNING")
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        async with serving_process(argv) as (target, _):
            phase = functools.partial(
                run_phase, target, list(texts), 0, texts_per_call=SERVICE_TEXTS_PER_CALL, clients=clients
            )
            await loop.run_in_executor(
                pool, functools.partial(phase, "warm", "continuous", requests=2 * clients)
            )
            result = await loop.run_in_executor(
                pool, functools.partial(phase, "closed", "continuous", duration_s=duration_s)
            )
    assert result is not None
    variant = "int8" if (model.model_dir / "int8" / "manifest.json").is_file() else "fp32"
    return ServiceResult(
        model.name,
        variant,
        clients,
        SERVICE_TEXTS_PER_CALL,
        result.seconds,
        result.output_tokens_per_s,
        result.requests,
        sum(result.error_codes.values()),
    )


# --- the report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeersRun:
    command: str
    corpus: str
    models: dict[str, str]  # name → description
    sentences: dict[str, int]
    rounds: int
    cells: list[CellResult]
    memory: list[MemoryResult]
    service: list[ServiceResult]
    versions: dict[str, str]
    minutes: float
    load_before: float
    machine: Machine


def load_run(path: Path) -> PeersRun:
    """A run as `main` wrote it to `path` (JSON)."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    machine = raw["machine"]
    return PeersRun(
        **{
            **raw,
            "cells": [CellResult(**c) for c in raw["cells"]],
            "memory": [MemoryResult(**m) for m in raw["memory"]],
            "service": [ServiceResult(**x) for x in raw["service"]],
            "machine": Machine(**{**machine, "vector_extensions": tuple(machine["vector_extensions"])}),
        }
    )


def best(cells: Sequence[CellResult], family: str, model: str, beam: int, batch: int) -> CellResult | None:
    """The fastest setting of `family` (engine, ct2, transformers) in one cell."""
    return max(
        (
            c
            for c in cells
            if c.system.startswith(family) and c.model == model and c.beam == beam and c.batch == batch
        ),
        key=lambda c: c.tokens_per_s,
        default=None,
    )


def machine_slug(machine: Machine) -> str:
    """A short file-name-safe name of the machine: its CPU and usable cores."""
    cpu = machine.cpu.split("(")[0].lower()
    words = [w for w in "".join(ch if ch.isalnum() else " " for ch in cpu).split() if w not in ("processor",)]
    return "-".join([*words[:4], f"{machine.usable_cores}c"])


def render(run: PeersRun, interpretation: str) -> str:
    m = run.machine
    lines = [
        "# Peers: this engine against CTranslate2 and Transformers on the same weights",
        "<!-- Generated by `python -m bench.peers` (`make bench-peers`); rerun it rather than edit. -->",
        "",
        f"Machine: {m.cpu}, {m.usable_cores} usable cores of {m.logical_cores}, "
        f"{', '.join(m.vector_extensions) or 'no vector extensions listed'}; load {run.load_before:.2f} "
        f"before the run; {m.system}, Python {m.python}; "
        + ", ".join(f"{k} {v}" for k, v in run.versions.items())
        + ".",
        f"Command: `{run.command}` ({run.minutes:.0f} minutes). Sentences: {run.corpus}; "
        + ", ".join(f"{n} for the {k} model" for k, n in run.sentences.items())
        + f"; median of {run.rounds} interleaved rounds per setting.",
        "",
        "Models: " + "; ".join(f"**{k}**: {v}" for k, v in run.models.items()) + ".",
        "",
        "Settings: `threads t × c` = t intra-op threads per run, c batches decoded at once (CTranslate2's "
        "inter_threads, this engine's and Transformers' callers). Output tokens count one end token per "
        "sentence. *agree* = sentences whose tokens equal this engine's first setting's. The ratio is "
        "this engine's best setting over CTranslate2's best in the same cell. Transformers runs only "
        f"at batch ≥ {TRANSFORMERS_MIN_BATCH}.",
    ]
    for model in run.models:
        for beam in sorted({c.beam for c in run.cells if c.model == model}):
            cells = [c for c in run.cells if c.model == model and c.beam == beam]
            batches = sorted({c.batch for c in cells})
            strategy = "greedy" if beam == 1 else f"beam {beam}"
            lines += ["", f"## {model} model, {strategy}: output tokens/s", ""]
            lines.append("| setting | " + " | ".join(f"b={b}" for b in batches) + " | agree | ms/batch |")
            lines.append("|---|" + "---:|" * (len(batches) + 2))
            for setting in dict.fromkeys(c.setting for c in cells):
                row = {c.batch: c for c in cells if c.setting == setting}
                agree = min(c.agreement for c in row.values())
                lines.append(
                    f"| {setting} | "
                    + " | ".join(f"{row[b].tokens_per_s:,.0f}" if b in row else "" for b in batches)
                    + f" | {100 * agree:.1f} % | "
                    + " / ".join(f"{row[b].batch_ms:.1f}" for b in batches if b in row)
                    + " |"
                )
            ratios = []
            for b in batches:
                ours, theirs = best(cells, "engine", model, beam, b), best(cells, "ct2", model, beam, b)
                ratios.append(f"{ours.tokens_per_s / theirs.tokens_per_s:.2f}×" if ours and theirs else "")
            lines.append("| **engine best / CTranslate2 best** | " + " | ".join(ratios) + " | | |")
    if run.memory:
        lines += ["", "## Peak resident memory (greedy, batch 64, a fresh process each)", ""]
        lines += ["| model | setting | after imports | loaded | peak |", "|---|---|---:|---:|---:|"]
        for r in run.memory:
            lines.append(
                f"| {r.model} | {r.setting} | {r.baseline_mb:.0f} MiB | {r.loaded_mb:.0f} MiB "
                f"| {r.peak_mb:.0f} MiB |"
            )
    if run.service:
        lines += ["", f"## The service: closed gRPC loop, {SERVICE_TEXTS_PER_CALL} texts per call", ""]
        lines += [
            "| model | variant | clients | calls | errors | output tok/s | engine best at b=8 | ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for s in run.service:
            engine = best(run.cells, "engine", s.model, 1, SERVICE_TEXTS_PER_CALL)
            ceiling = f"{engine.tokens_per_s:,.0f}" if engine else ""
            ratio = f"{s.output_tokens_per_s / engine.tokens_per_s:.2f}×" if engine else ""
            lines.append(
                f"| {s.model} | {s.variant} | {s.clients} | {s.calls} | {s.errors} | "
                f"{s.output_tokens_per_s:,.0f} | {ceiling} | {ratio} |"
            )
    lines += ["", "![output tokens/s against batch size](peers.png)", ""]
    lines += ["## What the figures say, and what each engine change bought", "", INTERPRETATION_BEGIN]
    lines += [interpretation, INTERPRETATION_END, ""]
    return "\n".join(lines)


def plot(run: PeersRun, path: Path) -> None:
    """Tokens/s against batch size, each family's best setting per cell, one panel per model × beam."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(
        {(c.model, c.beam) for c in run.cells}, key=lambda p: (list(run.models).index(p[0]), p[1])
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    labels = {"engine": "this engine", "ct2": "CTranslate2", "transformers": "Transformers"}
    for ax, (model, beam) in zip(axes[0], panels, strict=True):
        batches = sorted({c.batch for c in run.cells if c.model == model and c.beam == beam})
        for family, label in labels.items():
            points = [(b, best(run.cells, family, model, beam, b)) for b in batches]
            xs = [b for b, c in points if c is not None]
            ys = [c.tokens_per_s for _, c in points if c is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_title(f"{model} model, {'greedy' if beam == 1 else f'beam {beam}'}")
        ax.set_xlabel("batch size")
        ax.set_ylabel("output tokens/s (best setting)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(f"{run.machine.cpu.split('(')[0].strip()}, {run.machine.usable_cores} cores", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _versions() -> dict[str, str]:
    names = ("onnxruntime", "ctranslate2", "torch", "transformers")
    return {n: importlib.metadata.version(n) for n in names}


# --- the command ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = benchmark_parser("bench.peers", __doc__)
    parser.add_argument("--models", default="default,base", help="comma-separated: default, base")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--beams", default=",".join(map(str, BEAMS)))
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help="system:threadsxcallers, ...")
    parser.add_argument("--sentences", type=int, default=500, help="of the default model's pool")
    parser.add_argument("--base-sentences", type=int, default=32, help="of the base model's pool")
    parser.add_argument(
        "--base-size",
        default=",".join(str(getattr(Size(), f.name)) for f in dataclasses.fields(Size)),
        help="the base model's d_model,layers,heads,ffn,vocab",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory phase")
    parser.add_argument("--no-service", action="store_true", help="skip the gRPC phase")
    parser.add_argument(
        "--memory-only", action="store_true", help="measure memory again, the rest from the last --json"
    )
    parser.add_argument("--service-seconds", type=float, default=15.0)
    parser.add_argument("--work-dir", type=Path, help="keep the checkpoints and conversions here")
    parser.add_argument("--json", type=Path, help="default: bench/results/peers-<machine>.json")
    parser.add_argument("--plot", type=Path, help="default: the PNG beside --out")
    add_out(parser, DEFAULT_OUT)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    settings = [parse_setting(s) for s in args.settings.split(",") if s]
    batches = [int(b) for b in args.batches.split(",")]
    beams = [int(b) for b in args.beams.split(",")]
    texts, origin = load_texts(args.corpus)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    cells: list[CellResult] = []
    memory: list[MemoryResult] = []
    service: list[ServiceResult] = []
    models: dict[str, str] = {}
    counts: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peers-")))
        work.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            model = (
                prepare_default(args.model_dir, work)
                if name == "default"
                else prepare_base(work, Size(*(int(x) for x in args.base_size.split(","))))
            )
            count = args.sentences if name == "default" else args.base_sentences
            manifest = load_manifest(model.model_dir)
            tokenizer = Tokenizer.from_file(model.model_dir / manifest.tokenizer)
            limit = manifest.limits.max_source_tokens
            sources = [tokenizer.encode_source(t, limit) for t in texts[:count]]
            models[name], counts[name] = model.description, len(sources)
            if not args.memory_only:
                cells += measure_cells(model, settings, sources, batches, beams, args.rounds, log)
            if not args.no_memory:
                memory += measure_memory(model, settings, sources)
            if not args.no_service and not args.memory_only:
                service.append(asyncio.run(measure_service(model, texts[:count], 16, args.service_seconds)))
    machine = describe_machine()
    out_json = args.json or RESULTS_DIR / f"peers-{machine_slug(machine)}.json"
    if args.memory_only:  # the rest of the page from the last run, its memory measured again
        last = load_run(out_json)
        run = dataclasses.replace(last, memory=memory, command=f"{last.command}; then {_command(argv)}")
    else:
        run = PeersRun(
            _command(argv),
            origin,
            models,
            counts,
            args.rounds,
            cells,
            memory,
            service,
            _versions(),
            (time.perf_counter() - started) / 60,
            load_before,
            machine,
        )
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(dataclasses.asdict(run), indent=1, default=str) + "\n", encoding="utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = kept_interpretation(args.out) or "_Not written yet: put it between these two comments._"
    args.out.write_text(render(run, kept), encoding="utf-8")
    plot(run, args.plot or args.out.with_suffix(".png"))
    log(f"wrote {args.out}, {out_json}")
    return 0


def _command(argv: Sequence[str] | None) -> str:
    return " ".join(["python -m bench.peers", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
