"""Helpers of the deploy tests: finding nginx / Prometheus binaries (skip here, fail in CI), free ports."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# Debian installs nginx in /usr/sbin, which is not on every user's PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_binary(name: str, package: str) -> str:
    """The path of `name`; skips the test when it is missing, fails it under CI=true (.ci/run installs it)."""
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is not None:
        return path
    reason = (
        f"`{name}` is not installed: the deploy topology tests need Debian's {package} package "
        f"(sudo apt-get install --no-install-recommends {package}; .ci/run installs it)"
    )
    if in_ci():
        pytest.fail(f"{reason}. Under CI=true a missing binary is a failure, not a skip.", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS's choice; another process could still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
