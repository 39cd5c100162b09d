"""Evaluate a model directory on the corpus splits and write its model card (JSON + markdown).

    python -m export.training.evaluate --model-dir models/en-fr-small [--corpus-dir data/corpus]

BLEU and chrF are sacreBLEU's corpus scores, exact match the share of outputs identical to the
reference (export.training.scoring, which the variants' quality gate shares).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from export.checkpoint import TOKENIZER_FILE, WEIGHTS_FILE, load_model
from export.corpus import read_pairs
from export.model import Transformer
from export.training.scoring import DECODERS, Scores, cpu_name, score
from export.translate import translate_texts
from service.modeldir.tokenizer import Tokenizer

SPLITS = ("valid", "test", "heldout")
SPLIT_TITLES = {"valid": "valid", "test": "test", "heldout": "held-out combinations"}
CARD_JSON, CARD_MD = "model_card.json", "model_card.md"
# The issue's quality bar, checked and reported in the card.
QUALITY_BAR = {("test", "bleu"): 97.0, ("test", "exact_match"): 90.0, ("heldout", "bleu"): 90.0}


def evaluate_split(
    model: Transformer, tokenizer: Tokenizer, pairs: list[tuple[str, str]], beam_size: int
) -> tuple[Scores, list[str]]:
    start = time.perf_counter()
    hyps = translate_texts(model, tokenizer, [en for en, _ in pairs], beam_size=beam_size)
    return score(hyps, [fr for _, fr in pairs], time.perf_counter() - start), hyps


def quality_bar(results: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, object]]:
    """Each bar with the beam-search figure it is judged on."""
    out = []
    for (split, metric), minimum in QUALITY_BAR.items():
        value = results["beam4"][split][metric]
        out.append(
            {"split": split, "metric": metric, "minimum": minimum, "value": value, "met": value >= minimum}
        )
    return out


def render_markdown(card: dict) -> str:
    cfg = card["architecture"]
    lines = [
        f"# Model card: {card['name']}",
        "",
        "English→French encoder–decoder Transformer trained from scratch on the project's synthetic "
        "corpus (`export/corpus`). A demonstration model: it translates the corpus grammar and "
        "lexicon, nothing else.",
        "",
        f"- parameters: {card['parameters']:,}; "
        f"weights {card['weights_bytes'] / 1e6:.1f} MB (fp32 safetensors)",
        f"- d_model {cfg['d_model']}, {cfg['n_heads']} heads, "
        f"{cfg['n_encoder_layers']}+{cfg['n_decoder_layers']} layers, FFN {cfg['d_ff']}, "
        f"{cfg['activation']}, {cfg['norm_placement']}-norm, vocabulary {cfg['vocab_size']}",
        f"- max positions: {cfg['max_positions']} tokens per side",
        f"- evaluated on: {card['machine']}",
        "",
        "| split | decoding | BLEU | chrF | exact match % | sentences | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for decoder, per_split in card["results"].items():
        for split, s in per_split.items():
            figures = f"{s['bleu']:.2f} | {s['chrf']:.2f} | {s['exact_match']:.2f} | {s['sentences']}"
            lines.append(f"| {SPLIT_TITLES[split]} | {decoder} | {figures} | {s['seconds']} |")
    lines += ["", "Quality bar (beam 4):", ""]
    for bar in card["quality_bar"]:
        mark = "met" if bar["met"] else "NOT met"
        lines.append(f"- {bar['split']} {bar['metric']} ≥ {bar['minimum']}: {bar['value']} ({mark})")
    lines += ["", "Reproduce: `make train && make eval` (figures above come from `make eval`).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Evaluate a model and write its model card.")
    parser.add_argument("--model-dir", type=Path, default=Path("models/en-fr-small"))
    parser.add_argument("--corpus-dir", type=Path, default=Path("data/corpus"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--limit", type=int, default=0, help="evaluate only the first N sentences of each split"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model_dir)
    tokenizer = Tokenizer.from_file(args.model_dir / TOKENIZER_FILE)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for decoder, beam_size in DECODERS.items():
        results[decoder] = {}
        for split in SPLITS:
            pairs = read_pairs(args.corpus_dir / f"{split}.tsv")
            if args.limit:
                pairs = pairs[: args.limit]
            scores, _ = evaluate_split(model, tokenizer, pairs, beam_size)
            results[decoder][split] = scores.as_dict()
            print(
                f"{decoder:6} {split:8} BLEU {scores.bleu:6.2f}  chrF {scores.chrf:6.2f}  "
                f"exact {scores.exact_match:6.2f}%  ({scores.seconds:.0f} s)"
            )
    card = {
        "name": args.model_dir.name,
        "languages": {"source": "en", "target": "fr"},
        "architecture": model.cfg.to_dict(),
        "parameters": model.num_parameters(),
        "weights_bytes": (args.model_dir / WEIGHTS_FILE).stat().st_size,
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "metrics": "sacreBLEU corpus BLEU (13a) and chrF; exact match in percent",
        "results": results,
    }
    card["quality_bar"] = quality_bar(results)
    (args.model_dir / CARD_JSON).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    (args.model_dir / CARD_MD).write_text(render_markdown(card))
    print(f"wrote {args.model_dir / CARD_JSON} and {CARD_MD}")


if __name__ == "__main__":
    main()
