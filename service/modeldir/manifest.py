"""`manifest.json`: what a model directory holds, and the check that it holds exactly that.

The server trusts nothing in a model directory that the manifest does not describe and verify
(see docs/model-directory.md): `load_manifest` refuses a directory whose files are missing or
whose checksums disagree, and `check_graph` refuses an onnxruntime session whose inputs and
outputs are not the ones the manifest promises. Torch-free on purpose: the server imports it.

The exporter writes the manifest with `write_manifest`; `to_json` is deterministic (sorted keys,
fixed indent) so that exporting the same checkpoint twice gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol, TypeVar, cast, get_args

from service.modeldir.tokenizer import SpecialIds

FORMAT_VERSION = 2  # the only manifest format this code reads and writes
# Format 1: the decoder step took and returned the whole stacked cache (past_k → present_k);
# format 2 takes it per layer and returns only the new token's K/V (docs/model-directory.md).
_OLD_STEP_CONTRACT = 1
MANIFEST_FILE = "manifest.json"
GRAPH_NAMES = ("encoder", "decoder_step", "attention")

Variant = Literal["fp32", "fp16", "int8"]
Dim = int | str  # a fixed size, or a symbolic one ("batch", "cache_len")

# Element types as the manifest spells them (numpy names) → as onnxruntime reports them.
ORT_TYPES = {
    "bool": "tensor(bool)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
}
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


class ModelDirectoryError(ValueError):
    """A model directory (or one of its files) is missing, stale, tampered with or inconsistent."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    dtype: str  # a key of ORT_TYPES
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the model: its file (relative to the model directory) and signature."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Languages:
    source: str  # e.g. "en"
    target: str  # e.g. "fr"


@dataclass(frozen=True)
class Decoding:
    """How an imported checkpoint decodes where it differs from this project's own models (which
    have no such record: padding and the start token are never generated)."""

    never_ids: tuple[int, ...]  # tokens never generated (the checkpoint's one-token bad words)
    multilingual: bool = False  # requests name a target language; its token is the first output
    forced_eos_at_limit: bool = False  # the end token is the last token the length limit allows
    # The checkpoint's generation defaults: beams when a request names no strategy, and the most
    # output tokens when it sets no limit (Transformers' num_beams, max_length - 1).
    default_beam_size: int = 1
    max_output_tokens: int | None = None


@dataclass(frozen=True)
class Limits:
    max_source_tokens: int  # specials included; = the model's max_positions
    max_target_tokens: int  # start token included; = the model's max_positions


@dataclass(frozen=True)
class ModelShape:
    """The model's dimensions, typed: what the server reads of `architecture`.

    The manifest records the exporter's TransformerConfig whole (writers and later formats need
    every field); the server reads only these, by name, so that a missing or ill-typed key is
    refused when the manifest is read rather than at the first request that needs it.
    """

    d_model: int  # D, the width of every residual stream
    heads: int  # H
    encoder_layers: int
    decoder_layers: int
    vocab_size: int  # V, the target vocabulary (the source one may differ: architecture.source_vocab_size)
    max_positions: int  # longest sequence on either side, specials included

    @property
    def head_dim(self) -> int:
        """Dh = D / H."""
        return self.d_model // self.heads

    @classmethod
    def from_architecture(cls, architecture: Mapping[str, Any]) -> ModelShape:
        """Read from the manifest's `architecture`; KeyError/TypeError/ValueError name the key."""
        values = {}
        for name, key in _SHAPE_KEYS.items():
            value = _field(architecture, key, int, within="architecture")
            if value < 1:
                raise ValueError(f"field 'architecture.{key}' must be positive, got {value}")
            values[name] = value
        shape = cls(**values)
        if shape.d_model % shape.heads:
            raise ValueError(
                f"architecture: d_model {shape.d_model} is not divisible by n_heads {shape.heads}"
            )
        return shape


# ModelShape field → its key in `architecture` (the TransformerConfig's names).
_SHAPE_KEYS = {
    "d_model": "d_model",
    "heads": "n_heads",
    "encoder_layers": "n_encoder_layers",
    "decoder_layers": "n_decoder_layers",
    "vocab_size": "vocab_size",
    "max_positions": "max_positions",
}


@dataclass(frozen=True)
class ExporterInfo:
    """The library versions that produced the graphs (for reproducing an export)."""

    torch: str
    onnx: str
    onnxruntime: str
    kind: str  # which torch.onnx exporter: "torchscript" or "dynamo"


@dataclass(frozen=True)
class Manifest:
    format_version: int
    name: str  # model name, e.g. "en-fr-small"
    version: str  # semantic version of the model
    languages: Languages
    variant: Variant
    architecture: Mapping[str, Any]  # the TransformerConfig as a dict, as written; typed: `shape`
    special_ids: SpecialIds
    limits: Limits
    opset: int  # ONNX opset of the graphs
    tokenizer: str  # file name of the tokenizer, relative to the model directory
    graphs: Mapping[str, GraphSpec]  # keyed by GRAPH_NAMES
    files: Mapping[str, str]  # relative path → sha256 hex of every file this variant needs
    quality: Mapping[str, Any] | None  # the model card's results for this variant, if evaluated
    exporter: ExporterInfo
    # A derived variant (export/variants/build.py): the fp32 manifest it came from, the tool and options
    # that made it, and the checks it passed. None for graphs exported from a checkpoint.
    derivation: Mapping[str, Any] | None = None
    decoding: Decoding | None = None  # None: this project's own conventions

    @property
    def never_ids(self) -> tuple[int, ...]:
        """Tokens decoding never chooses."""
        if self.decoding is not None:
            return self.decoding.never_ids
        return (self.special_ids.pad, self.special_ids.bos)

    @cached_property
    def shape(self) -> ModelShape:
        """The model's dimensions, typed (`from_dict` has checked that `architecture` has them)."""
        return ModelShape.from_architecture(self.architecture)


# ---------------------------------------------------------------------------------------------
# Writing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(model_dir: Path, files: Sequence[str]) -> dict[str, str]:
    """{relative path: sha256} of `files` inside `model_dir`."""
    return {name: sha256_file(model_dir / name) for name in sorted(files)}


def to_json(manifest: Manifest) -> str:
    """Deterministic JSON text of the manifest (sorted keys, indent 2, trailing newline)."""
    data = asdict(manifest)
    for optional in ("derivation", "decoding"):
        if data[optional] is None:
            # Absent rather than null: an exported (fp32) manifest has no derivation, one of this
            # project's own models no decoding record, and their readers never need the key.
            del data[optional]
    # asdict keeps tuples; JSON has only lists. Mappings become plain dicts for json.dumps.
    return json.dumps(_plain(data), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    """Write `manifest.json` into `model_dir`, refusing (ValueError) one that could not be read back."""
    text = to_json(manifest)
    from_dict(json.loads(text))  # the same validation the loader applies (semver, variant, paths)
    path = model_dir / MANIFEST_FILE
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Reading and verifying


def load_manifest(model_dir: Path | str) -> Manifest:
    """Read `manifest.json` of `model_dir` and verify every file it lists.

    Raises:
        ModelDirectoryError: the manifest is missing, unreadable, of an unsupported
            format_version or malformed; a listed file is missing or its checksum differs
            (stale or tampered); a graph or the tokenizer is not covered by the checksums.
    """
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise ModelDirectoryError(f"{path}: missing manifest (run `make export`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelDirectoryError(f"{path}: unreadable manifest: {err}") from err
    if not isinstance(data, dict):
        raise ModelDirectoryError(f"{path}: a manifest is a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version == _OLD_STEP_CONTRACT:
        raise ModelDirectoryError(
            f"{path}: format_version 1 was exported for the old decoder-step contract; "
            "re-export the model (make export)"
        )
    if version != FORMAT_VERSION:
        raise ModelDirectoryError(
            f"{path}: unsupported format_version {version!r} (this code reads {FORMAT_VERSION})"
        )
    try:
        manifest = from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        raise ModelDirectoryError(f"{path}: malformed manifest: {err}") from err
    _verify_files(model_dir, manifest)
    return manifest


def from_dict(data: Mapping[str, Any]) -> Manifest:
    """Build a Manifest from parsed JSON; KeyError/TypeError/ValueError name what is wrong."""
    variant = _field(data, "variant", str)
    if variant not in get_args(Variant):
        raise ValueError(f"variant {variant!r} is not one of {', '.join(get_args(Variant))}")
    version = _field(data, "version", str)
    if not _SEMVER.match(version):
        raise ValueError(f"version {version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    graphs_data = _field(data, "graphs", dict)
    if sorted(graphs_data) != sorted(GRAPH_NAMES):
        raise ValueError(f"graphs {sorted(graphs_data)} are not {sorted(GRAPH_NAMES)}")
    files = _field(data, "files", dict)
    for name, digest in files.items():
        _check_relative(name)
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"files[{name!r}] is not a sha256 hex digest")
    quality = data.get("quality")
    if quality is not None and not isinstance(quality, dict):
        raise TypeError(f"quality must be an object or null, got {type(quality).__name__}")
    derivation = data.get("derivation")
    if derivation is not None and not isinstance(derivation, dict):
        raise TypeError(f"derivation must be an object or null, got {type(derivation).__name__}")
    architecture = _field(data, "architecture", dict)
    ModelShape.from_architecture(architecture)  # refuse now what `Manifest.shape` could not read
    return Manifest(
        format_version=_field(data, "format_version", int),
        name=_field(data, "name", str),
        version=version,
        languages=_record(data, "languages", Languages, str),
        variant=cast(Variant, variant),
        architecture=architecture,
        special_ids=_record(data, "special_ids", SpecialIds, int),
        limits=_record(data, "limits", Limits, int),
        opset=_field(data, "opset", int),
        tokenizer=_check_relative(_field(data, "tokenizer", str)),
        graphs={name: _graph_from_dict(name, graphs_data[name]) for name in GRAPH_NAMES},
        files=dict(files),
        quality=quality,
        exporter=_record(data, "exporter", ExporterInfo, str),
        derivation=derivation,
        decoding=_decoding(data),
    )


def _decoding(data: Mapping[str, Any]) -> Decoding | None:
    if data.get("decoding") is None:
        return None
    record = _field(data, "decoding", dict)
    never = _field(record, "never_ids", list, within="decoding")
    if not all(isinstance(i, int) for i in never):
        raise TypeError("field 'decoding.never_ids' must be a list of ints")
    return Decoding(
        never_ids=tuple(never),
        multilingual=bool(record.get("multilingual", False)),
        forced_eos_at_limit=bool(record.get("forced_eos_at_limit", False)),
        default_beam_size=int(record.get("default_beam_size", 1)),
        max_output_tokens=None
        if record.get("max_output_tokens") is None
        else int(record["max_output_tokens"]),
    )


def _field(data: Mapping[str, Any], key: str, kind: type, within: str = "") -> Any:
    """data[key], refused unless present and a `kind`; `within` names the object holding it."""
    named = f"{within}.{key}" if within else key
    if key not in data:
        raise KeyError(f"missing field {named!r}")
    value = data[key]
    # bool is an int subclass in Python; a JSON true is never a valid count.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"field {named!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


_R = TypeVar("_R")


def _record(data: Mapping[str, Any], key: str, cls: Callable[..., _R], kind: type) -> _R:
    """A small record of the manifest (languages, special_ids, ...) whose fields are all `kind`."""
    values = _field(data, key, dict)
    for name in values:
        _field(values, name, kind)
    try:
        return cls(**values)
    except TypeError as err:  # missing or unknown fields
        raise TypeError(f"field {key!r}: {err}") from err


def _graph_from_dict(name: str, data: Any) -> GraphSpec:
    if not isinstance(data, dict):
        raise TypeError(f"graphs.{name} must be an object")
    return GraphSpec(
        file=_check_relative(_field(data, "file", str)),
        inputs=tuple(_tensor_from_dict(t) for t in _field(data, "inputs", list)),
        outputs=tuple(_tensor_from_dict(t) for t in _field(data, "outputs", list)),
    )


def _tensor_from_dict(data: Any) -> TensorSpec:
    if not isinstance(data, dict):
        raise TypeError("a graph input/output must be an object")
    name = _field(data, "name", str)
    dtype = _field(data, "dtype", str)
    if dtype not in ORT_TYPES:
        raise ValueError(f"{name}: unknown dtype {dtype!r} (known: {', '.join(ORT_TYPES)})")
    shape = _field(data, "shape", list)
    if not all(isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool)) for d in shape):
        raise TypeError(f"{name}: shape entries must be ints or symbolic names, got {shape}")
    return TensorSpec(name, dtype, tuple(shape))


def _check_relative(name: str) -> str:
    """Listed files must stay inside the model directory (onnxruntime refuses external data
    outside it too), so a manifest cannot make the server read arbitrary paths."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise ValueError(f"file {name!r} is not a relative path inside the model directory")
    return name


def _verify_files(model_dir: Path, manifest: Manifest) -> None:
    manifest_path = model_dir / MANIFEST_FILE
    needed = [manifest.tokenizer, *(g.file for g in manifest.graphs.values())]
    for name in needed:
        if name not in manifest.files:
            raise ModelDirectoryError(f"{manifest_path}: {name} has no checksum in 'files'")
    for name, expected in sorted(manifest.files.items()):
        path = model_dir / name
        if not path.is_file():
            raise ModelDirectoryError(f"{path}: missing (listed in {MANIFEST_FILE})")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelDirectoryError(
                f"{path}: checksum mismatch, the file is stale or tampered "
                f"(sha256 {actual[:12]}…, {MANIFEST_FILE} says {expected[:12]}…); re-export the model"
            )


class _NodeArg(Protocol):
    """What onnxruntime's `session.get_inputs()` items provide."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def shape(self) -> Sequence[int | str | None]: ...


class _Session(Protocol):
    def get_inputs(self) -> Sequence[_NodeArg]: ...
    def get_outputs(self) -> Sequence[_NodeArg]: ...


def check_graph(spec: GraphSpec, session: _Session) -> None:
    """Refuse a loaded graph whose signature is not the manifest's.

    Compares input and output names (as sets: onnxruntime feeds by name), element types, ranks,
    and every dimension that both sides fix to a number.

    Raises:
        ModelDirectoryError: naming the graph file and the first difference found.
    """
    _check_side(spec.file, "input", spec.inputs, session.get_inputs())
    _check_side(spec.file, "output", spec.outputs, session.get_outputs())


def _check_side(file: str, side: str, expected: Sequence[TensorSpec], actual: Sequence[_NodeArg]) -> None:
    found = {arg.name: arg for arg in actual}
    missing = [t.name for t in expected if t.name not in found]
    extra = sorted(set(found) - {t.name for t in expected})
    if missing or extra:
        raise ModelDirectoryError(
            f"{file}: graph {side}s {sorted(found)} do not match the manifest "
            f"(missing {missing}, unexpected {extra})"
        )
    for t in expected:
        arg = found[t.name]
        if arg.type != ORT_TYPES[t.dtype]:
            raise ModelDirectoryError(
                f"{file}: {side} {t.name!r} is {arg.type}, the manifest says {ORT_TYPES[t.dtype]}"
            )
        shape = list(arg.shape)
        if len(shape) != len(t.shape):
            raise ModelDirectoryError(
                f"{file}: {side} {t.name!r} has rank {len(shape)}, the manifest says {len(t.shape)}"
            )
        for axis, (have, want) in enumerate(zip(shape, t.shape, strict=True)):
            if isinstance(have, int) and isinstance(want, int) and have != want:
                raise ModelDirectoryError(
                    f"{file}: {side} {t.name!r} has size {have} on axis {axis}, the manifest says {want}"
                )


def derived_from_current(variant_dir: Path, model_dir: Path) -> bool:
    """Whether `variant_dir` holds a verified variant whose `derivation` names the fp32 manifest of
    `model_dir` as it is now (a variant built from older graphs is stale)."""
    try:
        manifest = load_manifest(variant_dir)
    except ModelDirectoryError:
        return False
    source = (manifest.derivation or {}).get("from", {}).get("manifest_sha256")
    return bool(source == sha256_file(model_dir / MANIFEST_FILE))
