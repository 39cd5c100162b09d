"""The dependency locks: the exact versions, with hashes, that every install of the project takes.

    python -m requirements.lock            # make lock: re-resolve to the newest allowed versions
    python -m requirements.lock --keep     # add or drop what pyproject.toml changed, keep every other pin
    python -m requirements.lock --check    # the running environment is exactly requirements/dev.txt

pyproject.toml keeps the ranges a user of the package needs; the files here pin what the suite last
passed with, so that a fresh clone, CI and the images install the same thing next week as today:

  dev.txt          make setup and .ci/run: the runtime, export and dev sets (torch ==2.13.0+cpu)
  runtime.txt      Dockerfile.cpu's runtime venv: pyproject's `dependencies`
  runtime-gpu.txt  Dockerfile.gpu's runtime venv: the same, onnxruntime-gpu in place of onnxruntime
  build.txt        both images' builder venv: the code generators, what builds the variants
                   (onnx, sacrebleu, never torch) and the build backend (setuptools)

pip-compile (pip-tools) resolves them, with every file's sha256, build backend and pip included.
The last three are resolved under dev.txt as a constraint, so they pin the same versions as CI
tests. onnxruntime is held at the newest release that onnxruntime-gpu also has (the GPU wheels
can lag the CPU ones by days), so that CI and both images run one onnxruntime.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK_DIR = ROOT / "requirements"
DEV, RUNTIME, RUNTIME_GPU, BUILD = "dev.txt", "runtime.txt", "runtime-gpu.txt", "build.txt"
# What the images' builder venv needs from the extras: the code generators (make proto) and what
# `python -m export.variants` imports besides the runtime.
BUILD_TOOLS = {"dev": ("grpcio-tools", "mypy-protobuf"), "export": ("onnx", "sacrebleu")}
# The extras that make setup installs (everything: training, export and the test/lint tools).
DEV_EXTRAS = ("export", "dev")
COMPILE_COMMAND = "make lock"

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
_HASH = re.compile(r"--hash=(sha256:[0-9a-f]{64})")


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
    pyproject: Mapping[str, object],
    *,
    extra: str | None = None,
    only: Sequence[str] = (),
    replace: Mapping[str, str] | None = None,
) -> list[str]:
    """The requirement strings of `[project].dependencies` (or of an optional-dependencies extra).

    Args:
        only: keep just these names.
        replace: swap a requirement for another (name → requirement string).
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


def read_pyproject(root: Path = ROOT) -> dict[str, object]:
    return tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    hashes: tuple[str, ...]  # "sha256:…", every file of that release the resolver saw


def read_lock(path: Path) -> dict[str, Pin]:
    """The pins of a pip-compile output file, by canonical name.

    Raises:
        ValueError: a requirement line that is not an exact `name==version` pin.
    """
    pins: dict[str, Pin] = {}
    current: tuple[str, str] | None = None
    hashes: list[str] = []

    def close() -> None:
        if current is not None:
            pins[current[0]] = Pin(current[0], current[1], tuple(hashes))

    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            hashes += _HASH.findall(line)
            continue
        if line.startswith("-"):
            continue  # a pip option line (--index-url, -c, …)
        close()
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: not an exact pin: {line!r}")
        current, hashes = (canonical(match.group(1)), match.group(2)), _HASH.findall(line)
    close()
    return pins


def environment_differences(lock: Mapping[str, Pin], project: str) -> list[str]:
    """How the running Python environment differs from `lock` (empty: it is exactly the lock).

    The project itself (installed editable, not locked) is the one distribution allowed beyond it.
    """
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    found = []
    for name, pin in sorted(lock.items()):
        version = installed.get(name)
        if version is None:
            found.append(f"{name}=={pin.version} is locked but not installed")
        elif version != pin.version:
            found.append(f"{name} {version} is installed, the lock says {pin.version}")
    extra = sorted(set(installed) - set(lock) - {canonical(project)})
    found += [f"{name} {installed[name]} is installed but not locked" for name in extra]
    return found


def pip_compile(
    source: str | Path,
    out: Path,
    *,
    stdin: str = "",
    options: Sequence[str] = (),
    relabel: Mapping[str, str] | None = None,
    upgrade: bool = True,
) -> None:
    """Run pip-compile on `source` (a file, or "-" for `stdin`) into `out`, hashes and all.

    `relabel` rewrites the names of inputs in the "# via" notes (stdin, temporary files). Without
    `upgrade`, the pins already in `out` stay wherever the inputs still allow them.
    """
    command = [
        sys.executable,
        "-m",
        "piptools",
        "compile",
        "--quiet",
        *(["--upgrade"] if upgrade else []),
        "--generate-hashes",
        "--allow-unsafe",  # pip and setuptools are part of what gets installed: lock them too
        "--strip-extras",
        "--no-emit-index-url",  # the machine's own package sources stay out of the file
        "--no-emit-find-links",
        *options,
        "--output-file",
        str(out),
        str(source),
    ]
    env = {**os.environ, "CUSTOM_COMPILE_COMMAND": COMPILE_COMMAND}
    subprocess.run(command, input=stdin, text=True, check=True, env=env, cwd=ROOT)
    text = out.read_text(encoding="utf-8")
    for old, new in {"-r -": "pyproject.toml", **(relabel or {})}.items():
        text = text.replace(old, new)
    out.write_text(text, encoding="utf-8")


def _runtime(pyproject: Mapping[str, object], **replace: str) -> list[str]:
    return requirements(pyproject, replace=replace)


def lock(lock_dir: Path = LOCK_DIR, *, keep: bool = False) -> None:
    """Re-resolve every lock file to the newest versions pyproject.toml allows (see the top); with
    `keep`, only add or drop what pyproject.toml changed, every other pin (onnxruntime's too) kept."""
    pyproject = read_pyproject()
    build_system = pyproject["build-system"]
    assert isinstance(build_system, dict)
    (onnxruntime,) = [r for r in _runtime(pyproject) if requirement_name(r) == "onnxruntime"]
    gpu = "onnxruntime-gpu" + onnxruntime[len("onnxruntime") :]
    with tempfile.TemporaryDirectory() as tmp:
        # The newest onnxruntime-gpu within pyproject's onnxruntime range, and that release for all.
        if keep:
            release = read_lock(lock_dir / DEV)["onnxruntime"].version
        else:
            probe = Path(tmp) / "gpu.txt"
            pip_compile("-", probe, stdin="\n".join(_runtime(pyproject, onnxruntime=gpu)))
            release = read_lock(probe)["onnxruntime-gpu"].version
        held = Path(tmp) / "onnxruntime.txt"
        held.write_text(f"onnxruntime=={release}\n", encoding="utf-8")
        options = [*(f"--extra={e}" for e in DEV_EXTRAS), "--build-deps-for=editable", "-c", str(held)]
        pip_compile(
            "pyproject.toml",
            lock_dir / DEV,
            options=options,
            relabel={str(held): "onnxruntime-gpu"},
            upgrade=not keep,
        )
    under_dev = ["-c", str((lock_dir / DEV).relative_to(ROOT))]
    pip_compile("pyproject.toml", lock_dir / RUNTIME, options=under_dev, upgrade=not keep)
    gpu_pinned = f"onnxruntime-gpu=={release}"
    gpu_set = "\n".join(_runtime(pyproject, onnxruntime=gpu_pinned))
    pip_compile("-", lock_dir / RUNTIME_GPU, stdin=gpu_set, options=under_dev, upgrade=not keep)
    tools = [
        r for extra, names in BUILD_TOOLS.items() for r in requirements(pyproject, extra=extra, only=names)
    ]
    build = [*_runtime(pyproject), *tools, *build_system["requires"]]
    pip_compile("-", lock_dir / BUILD, stdin="\n".join(build), options=under_dev, upgrade=not keep)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="compare the running environment with dev.txt instead"
    )
    parser.add_argument(
        "--keep", action="store_true", help="add or drop what pyproject.toml changed, keep the other pins"
    )
    args = parser.parse_args(argv)
    if not args.check:
        lock(keep=args.keep)
        return 0
    project = read_pyproject()["project"]
    assert isinstance(project, dict)
    found = environment_differences(read_lock(LOCK_DIR / DEV), project["name"])
    for line in found:
        print(f"requirements.lock: {line}", file=sys.stderr)
    if found:
        print(
            "requirements.lock: run `make setup` (or `make clean setup`) to install the lock", file=sys.stderr
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
