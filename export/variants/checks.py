"""What a variant must show before its manifest is written: translation quality (int8) and
agreement with the fp32 graphs (fp16, optimized).

Everything runs the graphs through onnxruntime on CPU: `service.engine.graphs.OnnxGraphs` (which verifies
each directory against its manifest) and the reference decoder `service.engine.reference_decoder`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.corpus import CorpusConfig, generate_corpus, read_pairs
from export.model_config import TransformerConfig
from export.onnx.contract import TRACE_SIZES, VERIFY_SIZES, example_inputs
from export.training.scoring import DECODERS, Scores, cpu_name, score
from service.engine.graphs import OnnxGraphs, pad_ids, step_difference
from service.engine.reference_decoder import translate_ids, translate_texts
from service.modeldir.tokenizer import Tokenizer

MAX_BLEU_DROP = 0.5  # the bar for int8, in BLEU points below fp32, for each decoding
OPTIMIZED_ATOL = 1e-4  # the optimized graphs against fp32: the exporter's own bar against PyTorch
SPLIT = "test"


class VariantCheckError(RuntimeError):
    """A variant failed a check it must pass: it gets no manifest."""


def read_test_split(corpus_dir: Path) -> list[tuple[str, str]]:
    """The (English, French) pairs of the test split: `<corpus_dir>/test.tsv` when it exists, else
    generated (the default corpus, as `make corpus` writes it)."""
    path = corpus_dir / f"{SPLIT}.tsv"
    if path.is_file():
        return read_pairs(path)
    # Each split draws from its own random stream (export.corpus.splits): the test split of a
    # corpus without a training split is the default one, without the cost of the training split.
    return [(p.en, p.fr) for p in generate_corpus(CorpusConfig(train_size=0))[SPLIT]]


def machine(threads: int) -> str:
    """Where figures were measured, for the manifest."""
    return f"{cpu_name()}, {threads} threads, onnxruntime {ort.__version__}"


# ---------------------------------------------------------------------------------------------
# Translation quality (int8)


def translation_scores(
    graphs: OnnxGraphs, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]
) -> dict[str, Scores]:
    """BLEU, chrF and exact match of the reference decoder, greedy and beam 4 (export.training.scoring)."""
    sources, references = [en for en, _ in pairs], [fr for _, fr in pairs]
    out = {}
    for decoder, beam_size in DECODERS.items():
        start = time.perf_counter()
        hypotheses = translate_texts(graphs, tokenizer, sources, beam_size=beam_size)
        out[decoder] = score(hypotheses, references, time.perf_counter() - start)
    return out


def quality_against_fp32(
    variant: str,
    graphs: OnnxGraphs,
    fp32: OnnxGraphs,
    tokenizer: Tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    whole_split: bool,
    threads: int,
) -> dict[str, Any]:
    """The variant's figures next to fp32's on the same sentences, and the BLEU drop.

    Returns:
        The manifest's `quality` block.
    Raises:
        VariantCheckError: BLEU drops by more than MAX_BLEU_DROP for greedy or beam search.
    """
    mine = translation_scores(graphs, tokenizer, pairs)
    reference = translation_scores(fp32, tokenizer, pairs)
    drops = {decoder: reference[decoder].bleu - mine[decoder].bleu for decoder in DECODERS}
    failed = {decoder: drop for decoder, drop in drops.items() if drop > MAX_BLEU_DROP}
    if failed:
        detail = ", ".join(
            f"{d}: BLEU {mine[d].bleu:.2f} vs fp32 {reference[d].bleu:.2f} (drop {failed[d]:.2f})"
            for d in failed
        )
        raise VariantCheckError(
            f"{variant}: quality below the bar on {len(pairs)} {SPLIT} sentences — {detail}; "
            f"a variant may lose at most {MAX_BLEU_DROP} BLEU"
        )
    return {
        "split": SPLIT,
        "sentences": len(pairs),
        "whole_split": whole_split,
        "machine": machine(threads),
        variant: {d: s.as_dict() for d, s in mine.items()},
        "fp32": {d: s.as_dict() for d, s in reference.items()},
        "bleu_drop": {d: round(drop, 2) for d, drop in drops.items()},
        "max_bleu_drop": MAX_BLEU_DROP,
    }


# ---------------------------------------------------------------------------------------------
# Agreement with fp32 (fp16, optimized)


def graph_parity(fp32: OnnxGraphs, graphs: OnnxGraphs) -> dict[str, dict[str, float]]:
    """Largest |difference| of every output of every graph from fp32's, on the contract's random
    example inputs (export.onnx.contract) at two sizes, one with an empty cache and padded rows.

    Float inputs reach the variant in its own float type; outputs are compared in float32.
    """
    cfg = TransformerConfig.from_dict(dict(fp32.manifest.architecture))
    sessions = {
        "encoder": (fp32.encoder, graphs.encoder),
        "decoder_step": (fp32.decoder_step, graphs.decoder_step),
        "attention": (fp32.attention_graph, graphs.attention_graph),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (reference, session) in sessions.items():
        if name == "decoder_step" and graphs.in_place:  # it writes a cache: compared through one
            pair = (graphs, graphs.new_cache())
            out[name] = {"log_probs": step_difference((fp32, fp32.new_cache()), pair)}
            continue
        spec = fp32.manifest.graphs[name]
        worst = dict.fromkeys((t.name for t in spec.outputs), 0.0)
        for seed, sizes in enumerate((TRACE_SIZES, VERIFY_SIZES)):
            feeds = example_inputs(cfg, spec, sizes, seed=seed)
            want = reference.run(None, feeds)
            own = {k: v.astype(graphs.float_dtype) if v.dtype == np.float32 else v for k, v in feeds.items()}
            got = session.run(None, own)
            for t, g, w in zip(spec.outputs, got, want, strict=True):
                worst[t.name] = max(worst[t.name], _max_abs_diff(g, w))
        out[name] = worst
    return out


def sentence_parity(
    fp32: OnnxGraphs, graphs: OnnxGraphs, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """On real sentences: the share of greedy translations token-identical to fp32's, and the
    largest |difference| of the next-token log-probabilities along fp32's translations
    (teacher-forced through the attention graph, one padded batch, real positions only)."""
    dims = fp32.dims
    sources = [tokenizer.encode_source(en, dims.max_positions) for en, _ in pairs]
    want = [h[0].tokens for h in translate_ids(fp32, sources)]
    got = [h[0].tokens for h in translate_ids(graphs, sources)]
    src_ids, src_mask = pad_ids(sources, dims.pad_id)
    tgt_ids, tgt_mask = pad_ids([[dims.bos_id, *tokens] for tokens in want], dims.pad_id)
    log_probs = [g.attention(src_ids, src_mask, tgt_ids, tgt_mask).log_probs for g in (graphs, fp32)]
    return {
        "split": SPLIT,
        "sentences": len(pairs),
        "greedy_identical": round(sum(g == w for g, w in zip(got, want, strict=True)) / len(pairs), 4),
        "max_abs_log_prob_diff": _max_abs_diff(*(lp[tgt_mask] for lp in log_probs)),  # (real positions, V)
    }


def cpu_parity(
    fp32: OnnxGraphs, graphs: OnnxGraphs, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """`graph_parity` and `sentence_parity` together, as a manifest records them."""
    return {
        "graphs": graph_parity(fp32, graphs),
        "sentences": sentence_parity(fp32, graphs, tokenizer, pairs),
    }


def _differences(parity: dict[str, Any]) -> dict[str, float]:
    """Every largest difference of a `cpu_parity` result, named "graph.output" or "sentences"."""
    named = {f"{g}.{o}": d for g, diffs in parity["graphs"].items() for o, d in diffs.items()}
    return {**named, "sentences": parity["sentences"]["max_abs_log_prob_diff"]}


def require_finite(variant: str, parity: dict[str, Any]) -> None:
    """Refuse a variant whose outputs overflow or turn NaN where fp32's do not.

    Raises:
        VariantCheckError: naming the outputs.
    """
    bad = [name for name, d in _differences(parity).items() if not math.isfinite(d)]
    if bad:
        raise VariantCheckError(f"{variant}: non-finite outputs on CPU: {', '.join(bad)}")


def require_fp32_parity(variant: str, parity: dict[str, Any]) -> None:
    """Refuse an fp32 variant that does not compute what the fp32 graphs compute.

    Raises:
        VariantCheckError: an output differs by more than OPTIMIZED_ATOL, or a greedy translation
            differs.
    """
    over = [f"{name} by {d:.2e}" for name, d in _differences(parity).items() if not d <= OPTIMIZED_ATOL]
    if over:
        raise VariantCheckError(
            f"{variant}: differs from the fp32 graphs (> {OPTIMIZED_ATOL}): {', '.join(over)}"
        )
    sentences = parity["sentences"]
    if sentences["greedy_identical"] != 1.0:
        raise VariantCheckError(
            f"{variant}: only {100 * sentences['greedy_identical']:.1f}% of {sentences['sentences']} greedy "
            "translations are token-identical to fp32's"
        )


def _max_abs_diff(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got.astype(np.float32) - want.astype(np.float32)), initial=0.0))
