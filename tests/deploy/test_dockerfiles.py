"""Static checks of deploy/docker/Dockerfile.{cpu,gpu} and .dockerignore (no Docker engine needed).

A small Dockerfile parser (continuation lines, comments, global ARGs, stages) reads each file; the
tests check what a build would trip over late or never: COPY sources that are missing from the
repository or filtered out of the context by .dockerignore, `COPY --from=` naming no earlier stage,
unpinned base images, and the runtime stage's contract (non-root numeric USER, a grpc.health.v1
HEALTHCHECK, exec-form ENTRYPOINT, the ports and model path the server uses, no build tools). The
builder derives the baked-in model's variant (int8 for CPU, fp16 for GPU: what `auto` loads) with
`python -m export.variants` in a throwaway venv: the tests read the locks the stage installs
(requirements/*.txt, every install with --require-hashes) and check that the venv gets no torch, has
every distribution export.variants imports, and stays out of the runtime stage with export/.
"""

from __future__ import annotations

import importlib.metadata
import json
import posixpath
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from requirements import lock
from service.config import SETTINGS, ServerConfig
from service.engine.engine import _DEFAULT_VARIANT

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER_DIR / "Dockerfile.cpu", "gpu": DOCKER_DIR / "Dockerfile.gpu"}
DEFAULT_MODEL = "models/en-fr-small"
# onnxruntime-gpu release (major.minor) → the CUDA major version its PyPI wheels are built for
# (https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements).
ORT_GPU_CUDA_MAJOR = {"1.31": 13}
# Nothing of these may be installed or run in a runtime stage.
BUILD_ONLY = ("torch", "grpcio-tools", "grpc_tools", "mypy-protobuf", "gcc", "g++", "build-essential")
# Each image bakes in the variant that the server's `auto` variant loads on its device.
IMAGE_DEVICE = {"cpu": "cpu", "gpu": "cuda"}
# Distributions that install the same module (here: whose metadata stands in for the other's).
SAME_MODULES = {"onnxruntime-gpu": "onnxruntime"}


# --- the parser ------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case, e.g. "COPY"
    args: str  # the rest, continuation lines joined
    line: int  # 1-based line of its first line

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """`--name=value` flags (a bare `--link` maps to "") and the remaining words (JSON form too)."""
        words = shlex.split(self.args, posix=True)
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        rest = " ".join(shlex.quote(w) for w in words)
        if self.args.rstrip().endswith("]"):
            start = self.args.index("[")
            try:
                words = json.loads(self.args[start:])
            except json.JSONDecodeError:
                words = shlex.split(rest)
        return flags, words

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ENTRYPOINT/CMD/RUN, None for the shell form."""
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


@dataclass
class Stage:
    index: int
    base: str  # FROM's image, global ARG defaults substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """Every ENV of the stage (`ENV k=v ...` form), later ones winning."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in shlex.split(instruction.args):
                key, sep, value = word.partition("=")
                assert sep, f"line {instruction.line}: use the `ENV key=value` form"
                values[key] = value
        return values


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each instruction: comments dropped, continuations joined."""
    out: list[tuple[int, str]] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # a blank line or a comment, also inside a continued instruction (as Docker does)
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        out.append((start, " ".join(part for part in buffer if part)))
        buffer = []
    assert not buffer, f"the last instruction (line {start}) ends with a line continuation"
    return out


def substitute(text: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"${name} has no ARG default"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in logical_lines(path.read_text(encoding="utf-8")):
        keyword, _, args = text.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), line)
        assert "<<" not in args or instruction.keyword != "RUN", f"{path.name}:{line}: no heredocs"
        if instruction.keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"{path.name}:{line}: FROM image [AS name]"
            stages.append(Stage(len(stages), substitute(words[0], global_args), name))
        elif not stages:
            assert instruction.keyword == "ARG", f"{path.name}:{line}: only ARG may precede FROM"
            key, _, default = args.strip().partition("=")
            global_args[key] = default.strip('"')
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(path, global_args, stages)


@cache
def dockerfile(kind: str) -> Dockerfile:
    return parse_dockerfile(DOCKERFILES[kind])


def test_the_parser_joins_continuations_and_drops_comments(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(
        "# syntax=docker/dockerfile:1\nARG BASE=python:3.11.14-slim\n\nFROM ${BASE} AS one\n"
        "RUN a \\\n    # a comment inside\n    && b \\\n\n    && c\nCOPY --from=one --chown=1:1 /x /y\n"
        'FROM one\nENTRYPOINT ["python", "-m", "service"]\n',
        encoding="utf-8",
    )
    parsed = parse_dockerfile(path)
    assert parsed.global_args == {"BASE": "python:3.11.14-slim"}
    assert [(s.base, s.name) for s in parsed.stages] == [("python:3.11.14-slim", "one"), ("one", None)]
    run, copy = parsed.stages[0].instructions
    assert (run.keyword, run.args, run.line) == ("RUN", "a && b && c", 5)
    assert copy.flags_and_words() == ({"from": "one", "chown": "1:1"}, ["/x", "/y"])
    entrypoint = parsed.final.last("ENTRYPOINT")
    assert entrypoint is not None and entrypoint.exec_form() == ["python", "-m", "service"]


# --- .dockerignore ---------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`, as moby's patternmatcher) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


@cache
def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, pattern) of each line of .dockerignore, in order."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        rules.append((negated, _pattern_regex(pattern.strip("/"))))
    return rules


def in_context(relative: str) -> bool:
    """Whether a path (relative to the repository root) is sent to the builder: the last rule that
    matches it or one of its parent directories decides (moby's MatchesOrParentMatches)."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negated, regex in dockerignore():
        if any(regex.match(p) for p in prefixes):
            included = negated
    return included


def test_dockerignore_matcher_semantics() -> None:
    assert _pattern_regex("**/__pycache__").match("service/__pycache__")
    assert _pattern_regex("**/__pycache__").match("__pycache__")
    assert _pattern_regex("models/*/int8").match("models/en-fr-small/int8")
    assert not _pattern_regex("*").match("service/server.py")  # one path element; parents decide


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "data/corpus/test.tsv",
        "runs/x.log",
        "tests/conftest.py",
        "bench/__init__.py",
        "service/__pycache__/server.cpython-311.pyc",
        "export/__pycache__/variants.cpython-311.pyc",
        "service/api/translator/v1/translator_pb2.py",  # regenerated in the builder
        f"{DEFAULT_MODEL}/int8/manifest.json",  # variants: local state, not committed
        f"{DEFAULT_MODEL}/fp16/manifest.json",
    ],
)
def test_the_context_leaves_out(path: str) -> None:
    assert not in_context(path), f"{path} would be sent to the Docker builder"


# --- COPY sources ----------------------------------------------------------------------------------


@cache
def tracked_files() -> list[str] | None:
    """The files git tracks or would (not ignored); None without git: the file system is walked."""
    try:
        result = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return [p for p in result.stdout.split("\0") if p]


def files_under(source: str) -> list[str]:
    tracked = tracked_files()
    if tracked is None:
        base = ROOT / source
        found = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        return [p.relative_to(ROOT).as_posix() for p in found if "__pycache__" not in p.parts]
    return [p for p in tracked if p == source or p.startswith(source.rstrip("/") + "/")]


def context_copies() -> list[tuple[str, str, Instruction, str]]:
    """(dockerfile kind, stage, COPY/ADD, source) of every copy from the build context."""
    found = []
    for kind in DOCKERFILES:
        for stage in dockerfile(kind).stages:
            for instruction in stage.all("COPY") + stage.all("ADD"):
                flags, words = instruction.flags_and_words()
                if "from" not in flags:
                    found += [(kind, stage.name or str(stage.index), instruction, s) for s in words[:-1]]
    return found


@pytest.mark.parametrize(
    ("kind", "stage", "instruction", "source"),
    context_copies(),
    ids=lambda v: v.args if isinstance(v, Instruction) else str(v),
)
def test_every_copy_source_exists_and_is_in_the_context(
    kind: str, stage: str, instruction: Instruction, source: str
) -> None:
    where = f"Dockerfile.{kind}:{instruction.line} (stage {stage})"
    assert instruction.keyword == "COPY", f"{where}: COPY, not ADD (no URLs or archives)"
    assert not source.startswith(("/", "..")), f"{where}: {source} is outside the build context"
    matches = [p for p in ROOT.glob(source)] if any(c in source for c in "*?[") else [ROOT / source]
    assert matches and all(p.exists() for p in matches), f"{where}: {source} does not exist"
    for match in matches:
        relative = match.relative_to(ROOT).as_posix()
        assert in_context(relative), f"{where}: {relative} is excluded by .dockerignore"
        files = files_under(relative)
        assert files, f"{where}: {relative} holds no file git would commit"
        left_out = [f for f in files if not in_context(f)]
        assert not left_out, f"{where}: .dockerignore leaves out {left_out[:5]}"


def test_the_baked_model_is_complete_in_the_context() -> None:
    manifest = json.loads((ROOT / DEFAULT_MODEL / "manifest.json").read_text(encoding="utf-8"))
    needed = ["manifest.json", *manifest["files"]]
    for name in needed:
        assert (ROOT / DEFAULT_MODEL / name).is_file(), name
        assert in_context(f"{DEFAULT_MODEL}/{name}"), f"{name} is excluded by .dockerignore"


# --- stages and base images ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_copy_from_names_an_earlier_stage(kind: str) -> None:
    parsed = dockerfile(kind)
    for stage in parsed.stages:
        earlier = {s.name for s in parsed.stages[: stage.index] if s.name}
        for instruction in stage.all("COPY"):
            flags, _ = instruction.flags_and_words()
            if "from" in flags:
                assert flags["from"] in earlier, (
                    f"Dockerfile.{kind}:{instruction.line}: --from={flags['from']} is no earlier stage "
                    f"({sorted(earlier)}); name images in a FROM … AS stage so that they are pinned too"
                )


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_base_images_are_pinned(kind: str) -> None:
    parsed = dockerfile(kind)
    names = {s.name for s in parsed.stages if s.name}
    for stage in parsed.stages:
        if stage.base in names:
            continue
        image, _, digest = stage.base.partition("@")
        last = image.rsplit("/", 1)[-1]
        tag = last.partition(":")[2]
        assert digest or (tag and tag != "latest"), f"Dockerfile.{kind}: {stage.base} is not pinned"
        assert digest or re.search(r"\d+\.\d+", tag), f"Dockerfile.{kind}: {stage.base}: a version tag"


# --- the runtime stage -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runtime_stage_runs_as_a_numeric_non_root_user(kind: str) -> None:
    user = dockerfile(kind).final.last("USER")
    assert user is not None, "the runtime stage sets no USER: it would run as root"
    uid, _, gid = user.args.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) > 0, f"USER {user.args}"
    assert not gid or (gid.isdigit() and int(gid) > 0), f"USER {user.args}"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runtime_stage_health_check_speaks_grpc_health(kind: str) -> None:
    check = dockerfile(kind).final.last("HEALTHCHECK")
    assert check is not None
    options, _, command = check.args.partition("CMD ")
    assert command, "HEALTHCHECK CMD …"
    assert "-m service.client" in command and re.search(r"\bhealth\b", command)
    assert "${TRANSLATOR_PORT}" in command or "$TRANSLATOR_PORT" in command  # follows the server's port
    assert "--start-period=" in options  # warm-up is not a failure


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runtime_stage_entrypoint_is_exec_form_and_signals_reach_the_server(kind: str) -> None:
    final = dockerfile(kind).final
    entrypoint = final.last("ENTRYPOINT")
    assert entrypoint is not None and entrypoint.exec_form(), "ENTRYPOINT [...] (a shell would eat SIGTERM)"
    argv = entrypoint.exec_form() or []
    assert argv[-3:] == ["python", "-m", "service"]
    if "tini" in argv[0]:
        assert argv[1] == "--"
        assert any("tini" in r.args for r in final.all("RUN")), "tini is used but not installed"
    cmd = final.last("CMD")
    assert cmd is None or cmd.exec_form() is not None
    stop = final.last("STOPSIGNAL")
    assert stop is not None and stop.args == "SIGTERM"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runtime_stage_exposes_the_server_ports(kind: str) -> None:
    final = dockerfile(kind).final
    exposed = {p.split("/")[0] for e in final.all("EXPOSE") for p in e.args.split()}
    env = final.env()
    grpc_port, metrics_port = env["TRANSLATOR_PORT"], env["TRANSLATOR_METRICS_PORT"]
    assert (int(grpc_port), int(metrics_port)) == (ServerConfig().port, ServerConfig().metrics_port)
    assert {grpc_port, metrics_port} <= exposed


# --- the baked-in model and its variant ------------------------------------------------------------


@dataclass(frozen=True)
class VariantBuild:
    """A `<python> -m export.variants ...` command of a RUN."""

    instruction: Instruction
    python: str  # the interpreter, e.g. /opt/build/bin/python
    options: dict[str, str]  # --model-dir, --only, ...

    @property
    def venv(self) -> str:
        return posixpath.dirname(posixpath.dirname(self.python))


def workdir(stage: Stage, instruction: Instruction) -> str:
    """The stage's working directory at `instruction` (its last WORKDIR before it; absolute ones)."""
    dirs = [w.args for w in stage.all("WORKDIR") if w.line < instruction.line]
    assert dirs and dirs[-1].startswith("/"), f"line {instruction.line}: an absolute WORKDIR before it"
    return dirs[-1]


def absolute(stage: Stage, instruction: Instruction, path: str) -> str:
    return posixpath.normpath(posixpath.join(workdir(stage, instruction), path))


def commands(run: Instruction) -> list[list[str]]:
    """The words of each `&&`-separated command of a shell-form RUN."""
    return [shlex.split(part) for part in run.args.split("&&") if part.strip()]


def variant_builds(stage: Stage) -> list[VariantBuild]:
    found = []
    for run in stage.all("RUN"):
        for words in commands(run):
            if words[1:3] == ["-m", "export.variants"]:
                rest = words[3:]
                assert len(rest) % 2 == 0 and all(w.startswith("--") for w in rest[::2]), words
                found.append(VariantBuild(run, words[0], dict(zip(rest[::2], rest[1::2], strict=True))))
    return found


def installs(stage: Stage) -> list[tuple[Instruction, str, list[str]]]:
    """(RUN, venv, words) of every `pip install` / `uv pip install` command of the stage."""
    found = []
    for run in stage.all("RUN"):
        for words in commands(run):
            if "install" not in words or "pip" not in " ".join(words):
                continue
            python = words[words.index("--python") + 1] if "--python" in words else words[0]
            found.append((run, posixpath.dirname(posixpath.dirname(python)), words))
    return found


def venv_requirements(stage: Stage, venv: str) -> list[str]:
    """The canonical names of every distribution the stage installs into `venv` from a lock."""
    names: list[str] = []
    for run, target, words in installs(stage):
        if target == venv:
            for i, word in enumerate(words):
                if word == "-r":
                    path = absolute(stage, run, words[i + 1])
                    assert path.startswith("/src/requirements/"), f"line {run.line}: {path} is not a lock"
                    names += lock.read_lock(ROOT / posixpath.relpath(path, "/src"))
    return names


def runtime_model_copy(kind: str) -> tuple[dict[str, str], str]:
    """(flags, source) of the runtime stage's COPY to TRANSLATOR_MODEL_DIRS."""
    final = dockerfile(kind).final
    target = final.env()["TRANSLATOR_MODEL_DIRS"]
    found = []
    for instruction in final.all("COPY"):
        flags, words = instruction.flags_and_words()
        if words[-1].rstrip("/") == target:
            found += [(flags, source) for source in words[:-1]]
    assert len(found) == 1, f"Dockerfile.{kind}: one COPY puts the default model at {target}"
    return found[0]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runtime_stage_serves_the_baked_model(kind: str) -> None:
    final = dockerfile(kind).final
    assert final.env()["TRANSLATOR_MODEL_DIRS"].startswith("/opt/"), "not under /models, where mounts go"
    assert final.env().get("TRANSLATOR_VARIANT", "auto") == "auto", "the variant the builder made is served"
    flags, source = runtime_model_copy(kind)
    assert "from" in flags, "the model comes from the stage that built its variant into it"
    stage = dockerfile(kind).stage(flags["from"])
    copied = [
        absolute(stage, i, words[-1])
        for i in stage.all("COPY")
        for f, words in [i.flags_and_words()]
        if "from" not in f and DEFAULT_MODEL in words[:-1]
    ]
    assert copied == [source], f"stage {stage.name} copies {DEFAULT_MODEL} from the context to {source}"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_builder_derives_the_variant_auto_loads(kind: str) -> None:
    flags, source = runtime_model_copy(kind)
    stage = dockerfile(kind).stage(flags["from"])
    builds = variant_builds(stage)
    assert len(builds) == 1, f"Dockerfile.{kind}: one `python -m export.variants` in stage {stage.name}"
    (build,) = builds
    assert absolute(stage, build.instruction, build.options["--model-dir"]) == source
    assert build.options["--only"] == _DEFAULT_VARIANT[IMAGE_DEVICE[kind]]
    model_copy = max(i.line for i in stage.all("COPY") if DEFAULT_MODEL in i.flags_and_words()[1][:-1])
    assert build.instruction.line > model_copy, "the variant is built after the model is copied in"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_variant_venv_stays_in_the_builder_and_has_no_torch(kind: str) -> None:
    parsed = dockerfile(kind)
    flags, _ = runtime_model_copy(kind)
    stage = parsed.stage(flags["from"])
    (build,) = variant_builds(stage)
    names = venv_requirements(stage, build.venv)
    assert {"onnx", "sacrebleu"} <= set(names), f"{build.venv}: what export.variants imports"
    assert not [n for n in names if n.startswith("torch")], f"{build.venv}: {names}"
    # Neither that venv nor the sources (export/) reach the runtime stage.
    export_dir = posixpath.join(workdir(stage, build.instruction), "export")
    for instruction in parsed.final.all("COPY"):
        copy_flags, words = instruction.flags_and_words()
        if copy_flags.get("from") != stage.name:
            continue
        for source in words[:-1]:
            for kept in (build.venv, export_dir):
                assert not (kept + "/").startswith(source.rstrip("/") + "/"), (
                    f"Dockerfile.{kind}:{instruction.line}: {source} takes {kept} into the runtime stage"
                )


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_export_comes_into_the_builder_after_the_project_is_built(kind: str) -> None:
    """The project's wheel takes the export package when export/ is there: it would reach the runtime
    venv (check_runtime.py refuses it too, at build time)."""
    builder = dockerfile(kind).stage("builder")
    builds = [
        r.line for r in builder.all("RUN") for w in commands(r) if "." in w and {"wheel", "--wheel"} & set(w)
    ]
    export_copies = [
        i.line
        for i in builder.all("COPY")
        if any(s.rstrip("/") == "export" for s in i.flags_and_words()[1][:-1])
    ]
    assert builds and export_copies
    assert min(export_copies) > max(builds)


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_every_install_takes_a_lock_with_hashes(kind: str) -> None:
    """What the image holds is what CI tested: locked versions, checked hashes, and no resolver run.

    The one exception is the project's own wheel, built in the stage (--no-deps)."""
    builder = dockerfile(kind).stage("builder")
    for run, venv, words in installs(builder):
        if any(w.endswith(".whl") for w in words):
            assert "--no-deps" in words, f"line {run.line}: the project's wheel brings no dependencies"
            continue
        assert "--require-hashes" in words and "-r" in words, f"line {run.line}: install {venv} from a lock"
    wanted = lock.RUNTIME_GPU if kind == "gpu" else lock.RUNTIME
    assert set(venv_requirements(builder, "/opt/venv")) == set(lock.read_lock(ROOT / "requirements" / wanted))


@cache
def modules_export_variants_imports() -> frozenset[str]:
    """Top-level modules that `import export.variants` loads (torch blocked), beyond a bare start."""
    listing = "print('\\n'.join({m.split('.')[0] for m, v in sys.modules.items() if v is not None}))"
    loaded = []
    for code in ("import sys", "import sys\nsys.modules['torch'] = None\nimport export.variants"):
        result = subprocess.run(
            [sys.executable, "-c", f"{code}\n{listing}"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        loaded.append(set(result.stdout.split()))
    return frozenset(loaded[1] - loaded[0])


def requirement_closure(names: set[str]) -> set[str]:
    """`names` and everything they require, as installed here (markers evaluated, no extras)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(SAME_MODULES.get(name, name)) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(lock.canonical(requirement.name))
    return seen


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_variant_venv_has_what_export_variants_imports(kind: str) -> None:
    """Every distribution whose modules `python -m export.variants` imports is installed (directly or
    as a dependency) into the venv that runs it in the builder: a missing one would fail the image
    build, which these tests cannot run."""
    parsed = dockerfile(kind)
    flags, _ = runtime_model_copy(kind)
    stage = parsed.stage(flags["from"])
    (build,) = variant_builds(stage)
    names = set(venv_requirements(stage, build.venv))
    available = requirement_closure(names)
    available |= {SAME_MODULES[n] for n in available if n in SAME_MODULES}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["name"]
    available.add(lock.canonical(project))  # export/ and service/: the build's own sources
    distributions = importlib.metadata.packages_distributions()
    missing = {
        module: distributions[module]
        for module in modules_export_variants_imports()
        if module in distributions and not {lock.canonical(d) for d in distributions[module]} & available
    }
    assert not missing, f"Dockerfile.{kind}: {build.venv} lacks {missing}"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_translator_variables_are_real_settings(kind: str) -> None:
    known = {s.env for s in SETTINGS}
    for stage in dockerfile(kind).stages:
        unknown = {k for k in stage.env() if k.startswith("TRANSLATOR_")} - known
        assert not unknown, f"Dockerfile.{kind}: no such setting: {sorted(unknown)}"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runtime_stage_installs_no_build_tools(kind: str) -> None:
    final = dockerfile(kind).final
    for run in final.all("RUN"):
        assert not re.search(r"\b(pip|uv)\b", run.args), f"line {run.line}: install in the builder stage"
        for word in BUILD_ONLY:
            assert not re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", run.args), f"line {run.line}"
    for instruction in final.all("COPY"):
        flags, words = instruction.flags_and_words()
        if "from" in flags:
            assert not any(w.startswith("/opt/build") for w in words), "the builder's tools stay there"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_builder_checks_the_runtime_environment(kind: str) -> None:
    builder = dockerfile(kind).stage("builder")
    checks = [r.args for r in builder.all("RUN") if "check_runtime.py" in r.args]
    assert checks, "the builder runs deploy/docker/check_runtime.py on the venv it hands over"
    if kind == "gpu":
        assert "--provider CUDAExecutionProvider" in checks[-1] and "--absent onnxruntime" in checks[-1]


# --- the GPU image: CUDA and onnxruntime-gpu -------------------------------------------------------


def test_gpu_image_matches_onnxruntime_gpu_cuda_major() -> None:
    parsed = dockerfile("gpu")
    version = lock.read_lock(ROOT / "requirements" / lock.RUNTIME_GPU)["onnxruntime-gpu"].version
    release = ".".join(version.split(".")[:2])
    assert release in ORT_GPU_CUDA_MAJOR, f"onnxruntime-gpu {release}: add its CUDA major to the test"
    base = parsed.global_args["CUDA_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base)
    assert match, f"{base}: a pinned NVIDIA CUDA runtime image with cuDNN"
    assert int(match.group(1)) == ORT_GPU_CUDA_MAJOR[release]
    assert parsed.stage("runtime").base == base and parsed.stage("builder").base == base
