"""bench.kv_cache smoke test: the benchmark runs at tiny sizes and every variant decodes exactly the
forced number of tokens, the same tokens as the KV-cached loop. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.kv_cache import load_sources, main, measure_cell
from bench.report import (
    INTERPRETATION_BEGIN,
    INTERPRETATION_END,
    Cell,
    Run,
    describe_machine,
    kept_interpretation,
    write_report,
)
from bench.variants import VARIANTS, ForcedLengthDecoders
from service.engine.graphs import ModelDims, OnnxGraphs
from service.engine.reference_decoder import translate_ids
from service.modeldir.tokenizer import Tokenizer

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "en-fr-small"
# 12 source tokens each (end token included), and one short sentence the 10–20 filter drops.
SENTENCES = [
    "The old doctor gives the red book to the children.",
    "I love cats.",
    "My sister does not like the small dogs.",
    "Is the teacher in the big house with Paul?",
]


@pytest.fixture(scope="module")
def decoders() -> ForcedLengthDecoders:
    return ForcedLengthDecoders(MODEL_DIR, intra_op_threads=1)


@pytest.fixture(scope="module")
def sources() -> list[list[int]]:
    tokenizer = Tokenizer.from_file(MODEL_DIR / "tokenizer.json")
    return [tokenizer.encode_source(s, 128) for s in SENTENCES[:3]]  # lengths 12, 7, 12: padded


@pytest.mark.parametrize("output_tokens", [1, 6])
def test_every_variant_decodes_exactly_n_tokens_identical_to_the_cache(
    decoders: ForcedLengthDecoders, sources: list[list[int]], output_tokens: int
) -> None:
    cached = decoders.decode("cached", sources, output_tokens)
    assert [len(tokens) for tokens in cached] == [output_tokens] * len(sources)
    for variant in VARIANTS[1:]:
        assert decoders.decode(variant, sources, output_tokens) == cached, variant


def test_forcing_only_removes_the_end(decoders: ForcedLengthDecoders, sources: list[list[int]]) -> None:
    """Banning the end token changes nothing before it: a forced output starts with the translation."""
    natural = translate_ids(OnnxGraphs(MODEL_DIR, intra_op_threads=1), sources)
    forced = decoders.decode("cached", sources, 24)
    for hyps, tokens in zip(natural, forced, strict=True):
        assert hyps[0].finished and len(hyps[0].tokens) < 24
        assert tokens[: len(hyps[0].tokens)] == hyps[0].tokens


def test_the_benchmark_runs_and_writes_its_page(tmp_path: Path) -> None:
    corpus = tmp_path / "test.tsv"
    corpus.write_text("".join(f"{en}\tx\n" for en in SENTENCES), encoding="utf-8")
    out = tmp_path / "page.md"
    args = ["--model-dir", str(MODEL_DIR), "--corpus", str(corpus), "--out", str(out)]
    assert main([*args, "--lengths", "3", "--batches", "1", "2", "--repeats", "1"]) == 0
    page = out.read_text(encoding="utf-8")
    assert "| 1 | 3 |" in page and "| 2 | 3 |" in page
    assert "all variants decoded token-identical outputs" in page
    assert (
        f"| onnxruntime | {describe_machine().onnxruntime}, CPUExecutionProvider, 1 intra-op thread," in page
    )
    assert "--lengths 3 --batches 1 2" in page
    assert kept_interpretation(out) is not None


def test_sources_keep_ten_to_twenty_tokens(tmp_path: Path) -> None:
    corpus = tmp_path / "test.tsv"
    corpus.write_text("".join(f"{en}\tx\n" for en in SENTENCES), encoding="utf-8")
    tokenizer = Tokenizer.from_file(MODEL_DIR / "tokenizer.json")
    chosen, origin = load_sources(tokenizer, corpus, 3)
    assert [len(ids) for ids in chosen] == [12, 12, 12] and str(corpus) in origin
    with pytest.raises(ValueError, match="only 3 sentences"):
        load_sources(tokenizer, corpus, 4)


class _FakeDecoders:
    """Every decode costs a fixed time per variant on a fake clock; the order of calls is kept."""

    def __init__(self, costs: dict[str, list[float]]) -> None:
        self.costs, self.now = costs, 0.0
        self.calls: list[str] = []

    def decode(self, variant: str, sources: list[list[int]], output_tokens: int) -> list[tuple[int, ...]]:
        self.calls.append(variant)
        timed = self.calls.count(variant) - 2  # the first call of each is the warm-up
        self.now += self.costs[variant][timed] if timed >= 0 else 0.0
        return [(5,) * output_tokens for _ in sources]


def test_variants_take_turns_and_speedups_are_paired_ratios() -> None:
    # Paired within each repeat: the median ratio is 2 here, the ratio of the medians (6 / 1.5) is 4.
    costs = {"cached": [1.0, 1.5, 3.0], "recompute": [2.0, 9.0, 6.0]}
    fake = _FakeDecoders(costs)
    cell = measure_cell(fake, [[4, 2]], 2, ["cached", "recompute"], 3, clock=lambda: fake.now)  # type: ignore[arg-type]
    timed = fake.calls[2:]
    assert timed == ["cached", "recompute", "recompute", "cached", "cached", "recompute"]
    assert cell.speedups == {"recompute": 2.0} and cell.seconds == {"cached": 1.5, "recompute": 6.0}
    assert cell.identical and cell.tokens_per_second("recompute") == 2 / 6.0


def test_regenerating_the_page_keeps_the_interpretation(tmp_path: Path) -> None:
    dims = ModelDims(2000, 3, 4, 40, 128, 0, 1, 2)
    arch = {"d_model": 160, "n_encoder_layers": 3, "d_ff": 640}
    cell = Cell(1, 16, {"cached": 0.01, "recompute": 0.03}, {"recompute": 3.0}, True)
    run = Run(
        model_dir=MODEL_DIR,
        dims=dims,
        architecture=arch,
        threads=1,
        repeats=5,
        variants=("cached", "recompute"),
        corpus="`x.tsv`",
        source_lengths=(12,),
        cells=(cell,),
        command="python -m bench.kv_cache",
        minutes=0.5,
        load_before=1.0,
        machine=describe_machine(),
    )
    out = tmp_path / "page.md"
    write_report(out, run)
    page = out.read_text(encoding="utf-8")
    assert "| 1 | 16 | 1,600 | 533 | **×3.0** |" in page
    out.write_text(page.replace("_Not written yet", "The cache wins.\n\n_Not written yet"), encoding="utf-8")
    write_report(out, run)
    kept = kept_interpretation(out)
    assert kept is not None and kept.startswith("The cache wins.")
    assert out.read_text(encoding="utf-8").count(INTERPRETATION_BEGIN) == 1
    assert out.read_text(encoding="utf-8").count(INTERPRETATION_END) == 1


def test_machine_comes_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: Some CPU\nflags\t\t: fpu avx2\n\n"
        "processor\t: 1\nmodel name\t: Other\n",
        encoding="utf-8",
    )
    machine = describe_machine(cpuinfo)
    assert machine.cpu == "Some CPU (family 25, model 17)" and machine.vector_extensions == ("avx2",)
