"""A transformer-base-sized MarianMT model imported and served: `python -m bench.import_hf`.

`make bench-import` runs it with the defaults.
The checkpoint is built here, never downloaded: Transformers' MarianMTModel with random weights at
the size of an OPUS-MT model (by default d_model 512, 6 encoder and 6 decoder layers, 8 heads, FFN
2048, one shared vocabulary of 32,000 entries), and a MarianTokenizer whose SentencePiece models
(unigram) are trained on a slice of this project's synthetic corpus. That corpus has a few
thousand distinct words, too few for 32,000 pieces: SentencePiece is asked for what the vocabulary
has room for with `hard_vocab_limit=False` and keeps what the corpus supports; vocab.json holds
`</s>`, `<unk>`, both models' pieces, placeholder entries `<unused-N>` up to the size and `<pad>`
last (as OPUS-MT's vocab.json puts it). No text encodes to a placeholder; the random decoder may
emit one, which decodes as its own spelling. The sizes of the tables, the graphs and the decoder's
output layer are those of a real model of that vocabulary.

Measured, in this order: the wall time of `python -m export.import_hf` (a subprocess: interpreter
and torch start-up included) and of `python -m export.variants --only int8`, the sizes of the
checkpoint and of the model directory (fp32, and its int8/ variant), then the resident memory of
`python -m service` (RSS of its process tree, from /proc) serving the default model alone and the
default model beside the imported one, fp32 and int8 (`--variant`), once SERVING (after load and
warm-up) and after a few Translate calls to the imported model by name (to the default model in
the run without it), with each process's peak.

Writes a markdown page (default docs/import-benchmark.md) with the machine. The checkpoint and the
model directory live in a temporary directory, or under --work-dir (kept). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import onnxruntime as ort

from bench.cli import add_out, benchmark_parser
from bench.inputs import load_texts
from bench.processes import process_tree_memory, service_argv, serving_process
from export.corpus import CorpusConfig, generate_corpus
from export.onnx.contract import GRAPH_FILES
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from service.modeldir.manifest import load_manifest

DEFAULT_OUT = Path("docs/import-benchmark.md")
MODEL_NAME = "marian-base-random"  # the imported directory's name, and so the served model's
VARIANTS = ("fp32", "int8")
MB = 1e6


@dataclass(frozen=True)
class Size:
    """The checkpoint's dimensions (Marian's config names in the comments)."""

    d_model: int = 512
    layers: int = 6  # encoder_layers and decoder_layers
    heads: int = 8  # encoder_attention_heads and decoder_attention_heads
    ffn: int = 2048  # encoder_ffn_dim and decoder_ffn_dim
    vocab: int = 32_000  # vocab_size (= decoder_vocab_size): vocab.json's entries

    @property
    def parameters(self) -> int:
        """Weights and biases, the embedding table counted once (tied), the LayerNorms included."""
        d, f = self.d_model, self.ffn
        attention = 4 * (d * d + d)
        ffn = d * f + f + f * d + d
        encoder = attention + ffn + 2 * 2 * d
        decoder = 2 * attention + ffn + 3 * 2 * d
        return self.layers * (encoder + decoder) + self.vocab * d + self.vocab  # + final_logits_bias


@dataclass(frozen=True)
class Vocabulary:
    size: int  # vocab.json's entries
    source_pieces: int  # of source.spm
    target_pieces: int  # of target.spm
    distinct_pieces: int  # in both, without repeats: vocab.json's real tokens
    corpus_pairs: int  # the slice both were trained on


@dataclass(frozen=True)
class Import:
    checkpoint_mb: float  # the checkpoint directory (weights and tokenizer files)
    import_s: float  # python -m export.import_hf, wall
    fp32_mb: float  # the model directory, its variants left out
    int8_s: float | None  # python -m export.variants --only int8, wall (its quality check included)
    int8_mb: float | None  # int8/; None, both, when the run left int8 out


@dataclass(frozen=True)
class Server:
    variant: str
    models: str  # in words
    rss_loaded_mb: float  # the tree's resident memory once SERVING
    rss_after_mb: float  # after the Translate calls
    peak_mb: float  # each process's peak resident memory, summed
    calls: int
    texts: int
    output_tokens: int
    call_s: float  # median wall time of one call


# --- the checkpoint ------------------------------------------------------------------------------


def _train_spm(texts: list[str], prefix: Path, pieces: int) -> Path:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(prefix),
        vocab_size=pieces,
        hard_vocab_limit=False,  # as many as the corpus supports, up to `pieces`
        model_type="unigram",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    model = prefix.with_suffix(".model")
    prefix.with_suffix(".vocab").unlink()
    return model


def marian_config(size: Size, pad_id: int) -> Any:
    """The MarianConfig of a checkpoint of `size`, OPUS-MT's conventions: one shared vocabulary,
    swish, scaled embeddings, decoding from the pad token, end token 0."""
    from transformers import MarianConfig  # torch: see build_checkpoint

    return MarianConfig(
        vocab_size=size.vocab,
        decoder_vocab_size=size.vocab,
        d_model=size.d_model,
        encoder_layers=size.layers,
        decoder_layers=size.layers,
        encoder_attention_heads=size.heads,
        decoder_attention_heads=size.heads,
        encoder_ffn_dim=size.ffn,
        decoder_ffn_dim=size.ffn,
        max_position_embeddings=512,
        pad_token_id=pad_id,
        eos_token_id=0,
        decoder_start_token_id=pad_id,
        activation_function="swish",
        scale_embedding=True,
    )


def build_checkpoint(
    out: Path, size: Size, corpus_pairs: int, seed: int = 0, forced_eos: bool = True
) -> Vocabulary:
    """A MarianMT checkpoint of `size` in `out` (config.json, model.safetensors, tokenizer files);
    without `forced_eos`, no end token is imposed at the length limit (Marian's default imposes it)."""
    # Imported here: `sessions_apart`'s spawned process imports this module, and must not hold torch
    import sentencepiece as spm
    import torch
    from transformers import MarianMTModel, MarianTokenizer

    out.mkdir(parents=True, exist_ok=True)
    splits = CorpusConfig(
        seed=seed + 7, train_size=corpus_pairs, valid_size=50, test_size=50, heldout_size=50
    )
    pairs = generate_corpus(splits)["train"]
    per_side = (size.vocab - 3) // 2  # room for both sides' pieces and the three specials
    counts = {}
    vocab = {"</s>": 0, "<unk>": 1}
    for side, texts in (("source", [p.en for p in pairs]), ("target", [p.fr for p in pairs])):
        _train_spm(texts, out / side, per_side).rename(out / f"{side}.spm")
        model = spm.SentencePieceProcessor(model_file=str(out / f"{side}.spm"))
        counts[side] = model.get_piece_size()
        for i in range(model.get_piece_size()):
            vocab.setdefault(model.id_to_piece(i), len(vocab))
    distinct = len(vocab) - 1  # <unk> is each model's piece 0 too
    while len(vocab) < size.vocab - 1:
        vocab[f"<unused-{len(vocab)}>"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Recommended: pip install sacremoses."
        tokenizer = MarianTokenizer(
            source_spm=str(out / "source.spm"),
            target_spm=str(out / "target.spm"),
            vocab=str(out / "vocab.json"),
            source_lang="en",
            target_lang="fr",
        )
    config = marian_config(size, pad_id=vocab["<pad>"])
    torch.manual_seed(seed)
    if not forced_eos:
        config.forced_eos_token_id = None
    model = MarianMTModel(config).eval()
    model.generation_config.bad_words_ids = [[vocab["<pad>"]]]  # as OPUS-MT checkpoints ship it
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Vocabulary(len(vocab), counts["source"], counts["target"], distinct, len(pairs))


# --- import, sizes --------------------------------------------------------------------------------


def _timed(argv: list[str]) -> float:
    """Run `argv` to the end (its output on this process's stderr); its wall seconds."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=sys.stderr)
    return time.perf_counter() - start


def directory_mb(path: Path) -> float:
    """The files directly in `path` (its sub-directories, the variants, left out), in MB."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / MB


def import_and_measure(checkpoint: Path, model_dir: Path, int8_sentences: int | None) -> Import:
    """Import `checkpoint` into `model_dir`, then (unless `int8_sentences` is None) build its int8
    variant, its quality measured on that many test sentences."""
    import_s = _timed([sys.executable, "-m", "export.import_hf", str(checkpoint), "--out", str(model_dir)])
    fp32_mb = directory_mb(model_dir)
    if int8_sentences is None:
        return Import(directory_mb(checkpoint), import_s, fp32_mb, None, None)
    variants = [sys.executable, "-m", "export.variants", "--model-dir", str(model_dir), "--only", "int8"]
    int8_s = _timed([*variants, "--sentences", str(int8_sentences)])
    return Import(directory_mb(checkpoint), import_s, fp32_mb, int8_s, directory_mb(model_dir / "int8"))


# --- the server -----------------------------------------------------------------------------------


def session_memory(directory: Path) -> dict[str, float]:
    """Graph → the resident MB its onnxruntime session (CPU, default options) adds, the graphs of
    `directory` loaded one after another into this process. Run it in a fresh process."""

    def resident() -> int:
        return process_tree_memory(os.getpid())[0]

    added, sessions = {}, []
    for graph, file in GRAPH_FILES.items():
        before = resident()
        sessions.append(ort.InferenceSession(str(directory / file), providers=["CPUExecutionProvider"]))
        added[graph] = (resident() - before) / MB
    return added


def sessions_apart(directory: Path) -> dict[str, float]:
    """`session_memory` in a process of its own (spawned: none of this one's torch or memory)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(session_memory, directory).result()


async def serve_and_measure(
    variant: str, model_dirs: Sequence[Path], model: str, batches: Sequence[list[str]], label: str
) -> Server:
    """`python -m service` serving `model_dirs` in `variant`: its memory once SERVING, then after
    each batch of texts was translated by `model` (one call each, in turn)."""
    argv = service_argv()
    argv += ["--log-level", "WARNING", "--variant", variant, "--model-dirs", ",".join(map(str, model_dirs))]
    async with serving_process(argv) as (target, pid):
        loaded, _ = process_tree_memory(pid)
        seconds, tokens = [], 0
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            for texts in batches:
                start = time.perf_counter()
                reply = await stub.Translate(
                    pb.TranslateRequest(texts=texts, options=pb.TranslateOptions(model=model)), timeout=300
                )
                seconds.append(time.perf_counter() - start)
                if reply.model != model or len(reply.translations) != len(texts):
                    raise RuntimeError(f"{model}: {len(texts)} texts answered by {reply.model}: {reply}")
                tokens += sum(t.output_tokens for t in reply.translations)
        after, peak = process_tree_memory(pid)
    return Server(
        variant,
        label,
        loaded / MB,
        after / MB,
        peak / MB,
        len(batches),
        sum(map(len, batches)),
        tokens,
        sorted(seconds)[len(seconds) // 2],
    )


# --- the page -------------------------------------------------------------------------------------


def render(
    size: Size,
    vocabulary: Vocabulary,
    imported: Import,
    servers: Sequence[Server],
    sessions: Mapping[str, Mapping[str, float]],
    command: str,
    default_model: Path,
    machine: str,
) -> str:
    """The page; `machine`: the machine's table (bench.report.machine_table)."""
    graph_rows = [
        f"| {variant} | "
        + " | ".join(f"{mb:,.0f}" for mb in added.values())
        + f" | {sum(added.values()):,.0f} |"
        for variant, added in sessions.items()
    ]
    graphs = list(next(iter(sessions.values())))  # the same three for every variant
    graph_head = " | ".join(f"`{graph}`" for graph in graphs)
    rows = []
    for variant in dict.fromkeys(s.variant for s in servers):
        alone, both = [s for s in servers if s.variant == variant]
        for s in (alone, both):
            rows.append(
                f"| {variant} | {s.models} | {s.rss_loaded_mb:,.0f} | {s.rss_after_mb:,.0f} | "
                f"{s.peak_mb:,.0f} | {s.calls} × {s.texts // s.calls} texts, {s.output_tokens:,} output "
                f"tokens, {s.call_s:.2f} s per call |"
            )
        share = both.rss_loaded_mb - alone.rss_loaded_mb, both.rss_after_mb - alone.rss_after_mb
        bold = [f"**{mb:+,.0f}**" for mb in share]
        rows.append(f"| {variant} | **the imported model's share** | {bold[0]} | {bold[1]} | | |")
    return f"""# Importing and serving a transformer-base-sized MarianMT model

<!-- Generated by `{command}`; a regeneration overwrites the page. -->

A MarianMT checkpoint at the size of an OPUS-MT model, built on this machine with random weights
(nothing downloaded): d_model {size.d_model}, {size.layers} encoder + {size.layers} decoder layers,
{size.heads} heads, FFN {size.ffn:,}, swish, one vocabulary of {vocabulary.size:,} entries shared by
source, target and output projection; {size.parameters / 1e6:.1f} M parameters. Its SentencePiece
models (unigram) were trained on {vocabulary.corpus_pairs:,} pairs of the project's synthetic corpus,
which supports {vocabulary.source_pieces:,} English and {vocabulary.target_pieces:,} French pieces
(`hard_vocab_limit=False`); vocab.json holds their {vocabulary.distinct_pieces:,} distinct pieces
and the specials, and placeholder entries (`<unused-N>`, never produced by encoding) fill it to
{vocabulary.size:,}, so that the embedding table and the output layer have a real model's size
(`bench/import_hf.py` says how). One run on a shared machine.

## Import

| | |
|---|---:|
{_import_rows(imported)}
{_INT8_NOTE if imported.int8_mb is not None else ""}
## Server memory

`python -m service` (its defaults on this machine but `--variant`): the resident memory of its
process tree once it reports SERVING (models loaded, warmed up), and after the Translate calls
(one after another, each with its texts, default options: greedy, up to 2 × source tokens + 10
output tokens; a random model rarely ends sooner), in MB. The default model is `{default_model}`;
the imported one, `{MODEL_NAME}`, is asked for by name (the default model gets the same calls where
it is served alone). Peak: each process's high-water mark (VmHWM), summed.

| variant | models served | RSS once serving (MB) | RSS after the calls (MB) | peak (MB) | calls |
|---|---|---:|---:|---:|---|
{chr(10).join(rows)}

Where it goes: each graph's onnxruntime session holds its own copy of the weights it reads (the fp32
graphs read theirs from `model.safetensors` into memory, each session for itself), so the weights
used by more than one graph are resident more than once; the attention graph, which only Attend
runs, holds all of them. The resident MB each session of `{MODEL_NAME}` adds, its graphs loaded one
after another (CPU, default session options) into a fresh process:

| variant | {graph_head} | all |
|---|{"---:|" * (len(graphs) + 1)}
{chr(10).join(graph_rows)}

## Machine

{machine}
"""


_INT8_NOTE = """
The int8 variant's graphs hold their weights inline, each graph its own, and int8 quantizes the
weight MatMuls only: the float embedding table (vocabulary × d_model) is in all three graphs.
"""


def _import_rows(imported: Import) -> str:
    rows = [
        ("checkpoint (`model.safetensors` and tokenizer files)", f"{imported.checkpoint_mb:,.1f} MB"),
        (
            "`python -m export.import_hf` (graphs exported and verified against PyTorch), wall",
            f"{imported.import_s:.1f} s",
        ),
        (
            "model directory, fp32 (weights once: the graphs point into `model.safetensors`)",
            f"{imported.fp32_mb:,.1f} MB",
        ),
    ]
    if imported.int8_s is None or imported.int8_mb is None:
        rows.append(("int8 variant", "not built in this run"))
    else:
        rows += [
            (
                "`python -m export.variants --only int8` (its quality check included), wall",
                f"{imported.int8_s:.1f} s",
            ),
            ("`int8/` (graphs with their weights inline)", f"{imported.int8_mb:,.1f} MB"),
        ]
    return "\n".join(f"| {label} | {value} |" for label, value in rows)


def _variants(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names or set(names) - set(VARIANTS):
        raise argparse.ArgumentTypeError(f"{text!r}: choose among {','.join(VARIANTS)}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = benchmark_parser("bench.import_hf", __doc__)
    size = Size()
    parser.add_argument("--d-model", type=int, default=size.d_model)
    parser.add_argument("--layers", type=int, default=size.layers, help="encoder layers = decoder layers")
    parser.add_argument("--heads", type=int, default=size.heads)
    parser.add_argument("--ffn", type=int, default=size.ffn)
    parser.add_argument("--vocab", type=int, default=size.vocab, help="vocab.json's entries")
    parser.add_argument(
        "--corpus-pairs", type=int, default=40_000, help="corpus pairs the SentencePiece models learn from"
    )
    parser.add_argument(
        "--variants", type=_variants, default=VARIANTS, help="the servers' variants: fp32, int8 or both"
    )
    parser.add_argument("--calls", type=int, default=4, help="Translate calls per server")
    parser.add_argument("--texts", type=int, default=4, help="texts per call")
    parser.add_argument(
        "--int8-sentences", type=int, default=20, help="test sentences of the int8 variant's quality check"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="kept; default: a temporary directory")
    add_out(parser, DEFAULT_OUT)
    return parser


def _command(args: argparse.Namespace) -> str:
    """The command line of this run, its flags where they differ from the defaults (--out and
    --work-dir left out)."""
    defaults = _parser().parse_args([])
    flags = [
        f"--{name.replace('_', '-')} {value}"
        for name, value in vars(args).items()
        if name not in ("out", "work_dir") and value != getattr(defaults, name)
    ]
    return " ".join(["python -m bench.import_hf", *flags])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if min(args.calls, args.texts, args.corpus_pairs, args.vocab) < 1:
        raise SystemExit("--calls, --texts, --corpus-pairs and --vocab must be positive")
    size = Size(args.d_model, args.layers, args.heads, args.ffn, args.vocab)
    texts, _ = load_texts(args.corpus, args.calls * args.texts)
    batches = [texts[i : i + args.texts] for i in range(0, len(texts), args.texts)]
    default_name = load_manifest(args.model_dir).name
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-import-") as scratch:
        work = args.work_dir or Path(scratch)
        checkpoint, model_dir = work / "checkpoint", work / MODEL_NAME
        if model_dir.exists():
            raise SystemExit(f"{model_dir} exists: give an empty --work-dir")
        vocabulary = build_checkpoint(checkpoint, size, args.corpus_pairs)
        print(f"checkpoint: {size.parameters / 1e6:.1f} M parameters, {vocabulary}", file=sys.stderr)
        int8 = args.int8_sentences if "int8" in args.variants else None
        imported = import_and_measure(checkpoint, model_dir, int8)
        print(imported, file=sys.stderr)
        sessions = {v: sessions_apart(model_dir if v == "fp32" else model_dir / v) for v in args.variants}
        print(f"sessions: {sessions}", file=sys.stderr)

        async def servers() -> list[Server]:
            out = []
            for variant in args.variants:
                for dirs, model, label in (
                    ([args.model_dir], default_name, "the default model alone"),
                    ([args.model_dir, model_dir], MODEL_NAME, f"the default model and {MODEL_NAME}"),
                ):
                    out.append(await serve_and_measure(variant, dirs, model, batches, label))
                    print(out[-1], file=sys.stderr)
            return out

        measured = asyncio.run(servers())
    # Imported here: bench.report imports torch, which `sessions_apart`'s spawned process, importing
    # this module, must not hold
    from bench.report import describe_machine, machine_table

    command = _command(args)
    machine = machine_table(describe_machine(), load_before, [("command", f"`{command}`")])
    page = render(size, vocabulary, imported, measured, sessions, command, args.model_dir, machine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
