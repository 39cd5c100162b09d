"""The dependency locks (requirements/*.txt, make lock): complete, hashed, consistent with each other
and with pyproject.toml, and what this environment has installed."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from requirements import lock

LOCKS = (lock.DEV, lock.RUNTIME, lock.RUNTIME_GPU, lock.BUILD)


def pins(name: str) -> dict[str, lock.Pin]:
    return lock.read_lock(lock.LOCK_DIR / name)


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_is_exact_and_hashed(name: str) -> None:
    locked = pins(name)
    assert locked, f"{name} pins nothing"
    unhashed = [p.name for p in locked.values() if not p.hashes]
    assert not unhashed, f"{name}: no hashes for {unhashed} (pip would refuse the file)"


def test_dev_lock_satisfies_every_range_of_pyproject() -> None:
    """A dependency added or narrowed in pyproject.toml without `make lock` fails here."""
    pyproject = lock.read_pyproject()
    build_system = pyproject["build-system"]
    assert isinstance(build_system, dict)
    wanted = [
        *lock.requirements(pyproject),
        *(r for extra in lock.DEV_EXTRAS for r in lock.requirements(pyproject, extra=extra)),
        *build_system["requires"],
    ]
    dev = pins(lock.DEV)
    for line in wanted:
        requirement = Requirement(line)
        name = lock.canonical(requirement.name)
        assert name in dev, f"{name} is required by pyproject.toml but not locked: run make lock"
        assert requirement.specifier.contains(dev[name].version, prereleases=True), (
            f"{name}=={dev[name].version} is outside pyproject.toml's {requirement.specifier}: run make lock"
        )


@pytest.mark.parametrize("name", [lock.RUNTIME, lock.RUNTIME_GPU, lock.BUILD])
def test_image_locks_pin_what_ci_tests(name: str) -> None:
    """The images' versions are dev.txt's: onnxruntime-gpu at the onnxruntime release CI runs."""
    dev = {n: p.version for n, p in pins(lock.DEV).items()}
    dev["onnxruntime-gpu"] = dev["onnxruntime"]
    differ = {n: (p.version, dev.get(n)) for n, p in pins(name).items() if dev.get(n) != p.version}
    assert not differ, f"{name} differs from {lock.DEV} (its version, dev's): {differ}"


def test_runtime_locks_hold_the_server_and_nothing_for_training() -> None:
    runtime, gpu, build = pins(lock.RUNTIME), pins(lock.RUNTIME_GPU), pins(lock.BUILD)
    served = {lock.requirement_name(r) for r in lock.requirements(lock.read_pyproject())}
    assert served <= set(runtime)
    assert set(gpu) == set(runtime) - {"onnxruntime"} | {"onnxruntime-gpu"}
    for name, locked in ((lock.RUNTIME, runtime), (lock.RUNTIME_GPU, gpu), (lock.BUILD, build)):
        heavy = {"torch", "pytest", "mypy"} & set(locked)
        assert not heavy, f"{name} holds {heavy}"
    assert {"grpcio-tools", "mypy-protobuf", "onnx", "sacrebleu", "setuptools"} <= set(build)


def test_this_environment_is_exactly_the_dev_lock() -> None:
    """What make setup installed is the lock, version for version (pip freeze equals requirements/dev.txt)."""
    project = lock.read_pyproject()["project"]
    assert isinstance(project, dict)
    assert lock.environment_differences(pins(lock.DEV), project["name"]) == []


def test_read_lock_refuses_a_range(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("numpy>=2 \\\n    --hash=sha256:" + "0" * 64 + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not an exact pin"):
        lock.read_lock(path)


def test_requirements_keeps_swaps_and_refuses_unknown_names() -> None:
    pyproject = lock.read_pyproject()
    swapped = lock.requirements(pyproject, replace={"onnxruntime": "onnxruntime-gpu==1"})
    names = [lock.requirement_name(r) for r in swapped]
    assert "onnxruntime" not in names and "onnxruntime-gpu==1" in swapped
    tools = lock.requirements(pyproject, extra="dev", only=["grpcio-tools", "mypy-protobuf"])
    assert sorted(lock.requirement_name(r) for r in tools) == ["grpcio-tools", "mypy-protobuf"]
    with pytest.raises(KeyError):
        lock.requirements(pyproject, replace={"no-such-package": "x"})
