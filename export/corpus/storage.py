"""Reading and writing corpus files: ``<split>.tsv`` (en<TAB>fr), ``heldout_combinations.json`` and
``stats.json``. Output is byte-identical for identical input (sorted keys, fixed float rounding)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .config import SPLITS, Pair
from .lexicon import load_lexicon


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    with open(path, encoding="utf-8", newline="\n") as handle:
        for line in handle:
            en, fr = line.rstrip("\n").split("\t")
            pairs.append((en, fr))
    return pairs


def _words(text: str) -> int:
    return len(text.split())


def split_stats(pairs: list[Pair]) -> dict[str, object]:
    en_lengths = [_words(p.en) for p in pairs]
    fr_lengths = [_words(p.fr) for p in pairs]
    tags = Counter(tag for p in pairs for tag in p.tags)
    n = max(len(pairs), 1)
    return {
        "pairs": len(pairs),
        "distinct_en": len({p.en for p in pairs}),
        "en_words_mean": round(sum(en_lengths) / n, 3),
        "en_words_max": max(en_lengths, default=0),
        "fr_words_mean": round(sum(fr_lengths) / n, 3),
        "fr_words_max": max(fr_lengths, default=0),
        "tags": dict(sorted(tags.items())),
    }


def corpus_stats(splits: dict[str, list[Pair]]) -> dict[str, object]:
    return {
        "lexicon": load_lexicon().lemma_counts(),
        "splits": {name: split_stats(splits[name]) for name in SPLITS if name in splits},
    }


def heldout_report(splits: dict[str, list[Pair]]) -> dict[str, object]:
    """The held-out combinations, and per held-out sentence the ones it contains."""
    heldout = splits.get("heldout", [])
    return {
        "combinations": sorted({key for p in heldout for key in p.combos}),
        "sentences": [{"en": p.en, "combos": sorted(p.combos)} for p in heldout],
    }


def write_corpus(splits: dict[str, list[Pair]], out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        if name not in splits:
            continue
        with open(out / f"{name}.tsv", "w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(f"{p.en}\t{p.fr}\n" for p in splits[name])
    _write_json(out / "heldout_combinations.json", heldout_report(splits))
    _write_json(out / "stats.json", corpus_stats(splits))


def _write_json(path: Path, payload: object) -> None:
    text = json.dumps(payload, ensure_ascii=False, indent=1, sort_keys=True)
    path.write_text(text + "\n", encoding="utf-8")
