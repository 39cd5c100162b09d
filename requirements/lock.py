"""Requirements for the image builds, read from pyproject.toml so the Dockerfiles repeat no version.

    python deploy/docker/pyproject_requirements.py                      # the runtime `dependencies`
    python deploy/docker/pyproject_requirements.py --extra dev --only grpcio-tools,mypy-protobuf
    python deploy/docker/pyproject_requirements.py --replace onnxruntime=onnxruntime-gpu==1.31.1

Prints a requirements file (one requirement per line) on stdout. `--only` keeps the named
requirements, `--replace` swaps one for another (the GPU image: onnxruntime-gpu instead of the CPU
onnxruntime wheel, which would otherwise be installed next to it and shadow it). A name that the
list does not have is an error, so renaming a dependency in pyproject.toml fails the image build
instead of silently dropping it. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """The PEP 503 normalised form of a distribution name ("Foo_bar" → "foo-bar")."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The canonical distribution name a PEP 508 requirement string is about."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canonical(match.group(1))


def requirements(
    pyproject: dict[str, object],
    *,
    extra: str | None = None,
    only: Sequence[str] = (),
    replace: dict[str, str] | None = None,
) -> list[str]:
    """The requirement strings of `[project].dependencies` (or of an optional-dependencies extra).

    Raises:
        KeyError: the extra, a name of `only` or a name of `replace` is not there.
    """
    project = pyproject["project"]
    assert isinstance(project, dict)
    if extra is None:
        listed = list(project.get("dependencies", []))
    else:
        listed = list(project.get("optional-dependencies", {})[extra])
    by_name = {requirement_name(r): r for r in listed}
    missing = [n for n in [*only, *(replace or {})] if canonical(n) not in by_name]
    if missing:
        raise KeyError(f"not in the requirement list: {', '.join(missing)}")
    wanted = {canonical(n) for n in only}
    swaps = {canonical(k): v for k, v in (replace or {}).items()}
    return [swaps.get(n, r) for n, r in by_name.items() if not wanted or n in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--extra", default=None, help="an optional-dependencies group instead")
    parser.add_argument("--only", default="", help="comma-separated names to keep")
    parser.add_argument(
        "--replace", action="append", default=[], metavar="NAME=REQUIREMENT", help="swap one requirement"
    )
    args = parser.parse_args(argv)
    replace = dict(item.split("=", 1) for item in args.replace)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    data = tomllib.loads(args.pyproject.read_text(encoding="utf-8"))
    try:
        lines = requirements(data, extra=args.extra, only=only, replace=replace)
    except KeyError as err:
        print(f"{parser.prog}: {err.args[0]}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
