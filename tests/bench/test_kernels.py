"""bench.kernels runs every kernel it compares, and they compute the same products."""

from __future__ import annotations

import numpy as np
import pytest

from bench.kernels import attention_runs, main, matmul_sessions


def test_the_matrix_products_agree_within_int8_error() -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 48)) * 0.05).astype(np.float32)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    exact = x @ w
    for name, session in matmul_sessions(w).items():
        got = session.run(None, {"x": x})[0]
        assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max(), name


def test_it_prints_both_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--shapes", "32x16", "--rows", "1,3", "--slots", "8", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "| M 3, K 32, N 16 |" in out and "| 3 rows |" in out
    assert set(attention_runs(2, 2, 8, 8)) == {"MultiHeadAttention + present", "GroupQueryAttention in place"}
