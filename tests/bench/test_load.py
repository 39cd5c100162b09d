"""bench.load smoke test: the load generator runs against a real in-process server (one mode, tiny
duration, 2 clients) and writes well-formed JSON and markdown. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

from bench.load import main

REPO = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs_end_to_end_and_writes_its_results(tmp_path: Path) -> None:
    out, js = tmp_path / "benchmarks.md", tmp_path / "benchmarks.json"
    argv = [
        "--model-dir", str(REPO / "models" / "en-fr-small"),
        "--corpus", str(REPO / "data" / "corpus" / "test.tsv"),
        "--sentences", "16",
        "--duration", "1",
        "--concurrency", "2",
        "--stream-every", "2",
        "--open-fraction", "0.5",
        "--open-repeats", "2",
        "--texts-per-call", "2",
        "--modes", "continuous", "collect",
        "--engine-batches", "1", "4",
        "--threads", "1",
        "--instances", "2",
        "--repeats", "1",
        "--skip-kv",
        "--out", str(out),
        "--json", str(js),
    ]  # fmt: skip
    assert main(argv) == 0

    result = json.loads(js.read_text())
    # continuous with the clients asked, twice as many, then 2 texts per call; collect
    closed, more, paired, collect = result["closed"]
    assert collect["mode"] == "collect" and collect["clients"] == 2
    assert paired["texts_per_call"] == 2 and paired["clients"] == 2 and paired["streamed"] == 0
    assert paired["sentences_per_s"] > 0 and paired["requests"] > 0
    assert more["mode"] == "continuous" and more["clients"] == 4
    assert closed["mode"] == "continuous" and closed["load"] == "closed" and closed["clients"] == 2
    assert closed["requests"] > 0 and closed["errors"] == 0
    assert closed["streamed"] > 0 and closed["ttft"] is not None  # every 2nd request streamed
    assert closed["output_tokens_per_s"] > 0 and closed["mean_output_tokens"] >= 1
    lat = closed["latency"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert closed["server_ttft"]["p50"] <= lat["p99"]
    assert closed["server_cores"] > 0 and closed["client_cores"] > 0

    # both modes' open loops, alternating, two runs each at the one rate
    runs = [(r["mode"], r["repeat"]) for r in result["open"]]
    assert runs == [("continuous", 0), ("collect", 0), ("continuous", 1), ("collect", 1)]
    for opened in result["open"]:
        assert opened["load"] == "open" and opened["offered_rate"] == result["open"][0]["offered_rate"] > 0
        assert opened["requests"] + opened["errors"] + opened["unfinished"] > 0

    # one caller, as many callers as instances, one caller on every core's threads
    runs = [(e["batch"], e["callers"], e["threads"]) for e in result["engine"]]
    assert runs == [(1, 1, 1), (4, 1, 1), (1, 2, 1), (4, 2, 1), (1, 1, 0), (4, 1, 0)]
    assert all(e["output_tokens"] >= e["sentences"] == 16 for e in result["engine"])
    assert result["model"]["instances"] == 2 and "--instances 2" in result["modes"]["continuous"]
    assert result["kv"] is None
    # throughput with 1 and 2 texts per call, the p99 (the median of the two pairs' ratios); no KV
    assert [t["met"] is None for t in result["targets"]] == [False, False, False, True]
    assert "2 texts per call" in result["targets"][1]["name"]
    assert "median of 2 pairs" in result["targets"][2]["measured"]
    assert result["machine"]["cpu"] and result["model"]["variant"]

    page = out.read_text()
    for heading in (
        "## Targets",
        "## Service, closed loop",
        "## Service, open loop",
        "## Engine alone",
        "## Machine",
    ):
        assert heading in page
    assert "continuous batching" in page and "python -m bench.load" in page
