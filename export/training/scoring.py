"""Translation scores and where they were measured: what the model card (export.training.evaluate) and the
variants' quality gate (export.variants.checks) report. sacreBLEU and the standard library only, no
torch: the variants are built where torch is not installed (the Docker images' builder stage).

BLEU and chrF are sacreBLEU's corpus scores (default 13a tokenisation, so figures are comparable
with the usual reports); exact match is the share of outputs identical to the reference.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import sacrebleu

DECODERS = {"greedy": 1, "beam4": 4}  # name → beam size


@dataclass(frozen=True)
class Scores:
    bleu: float
    chrf: float
    exact_match: float  # percent
    sentences: int
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {
            "bleu": round(self.bleu, 2),
            "chrf": round(self.chrf, 2),
            "exact_match": round(self.exact_match, 2),
            "sentences": self.sentences,
            "seconds": round(self.seconds, 1),
        }


def score(hypotheses: list[str], references: list[str], seconds: float = 0.0) -> Scores:
    exact = 100.0 * sum(h == r for h, r in zip(hypotheses, references, strict=True)) / max(len(references), 1)
    return Scores(
        bleu=sacrebleu.corpus_bleu(hypotheses, [references]).score,
        chrf=sacrebleu.corpus_chrf(hypotheses, [references]).score,
        exact_match=exact,
        sentences=len(references),
        seconds=seconds,
    )


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    return platform.machine()
