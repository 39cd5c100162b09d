"""A missing nginx / Prometheus skips the topology tests here, but fails them under CI=true."""

from __future__ import annotations

import pytest

from tests.deploy import tools


def test_a_missing_binary_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no-such-binary-xyz.*apt-get install"):
        tools.require_binary("no-such-binary-xyz", "nginx")


def test_a_missing_binary_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="Under CI=true a missing binary is a failure"):
        tools.require_binary("no-such-binary-xyz", "nginx")


def test_a_present_binary_is_found() -> None:
    assert tools.require_binary("sh", "dash").endswith("/sh")
