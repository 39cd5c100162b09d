"""bench.request_stall runs end to end: the real service in a subprocess, each large call refused."""

from __future__ import annotations

import re

import pytest

from bench.request_stall import CASES, main


@pytest.mark.full  # a server subprocess, ≈10 s: make test-full and CI
def test_the_stall_benchmark_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--repeats", "1"])
    page = capsys.readouterr().out
    rows = re.findall(r"^\| (.+?) \| (\w+) \| ([\d,]+) \| (\d+), ([\d,]+), ([\d,]+) \|$", page, re.MULTILINE)
    assert [(name, code) for name, code, *_ in rows] == [(name, "INVALID_ARGUMENT") for name in CASES]
    assert "| small call alone (50 in a row) |  |  | 50, " in page and "| CPU |" in page
