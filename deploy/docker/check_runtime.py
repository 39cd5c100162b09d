"""The last step of an image's builder stage: the runtime environment is what it should be.

    /opt/venv/bin/python deploy/docker/check_runtime.py [--provider CUDAExecutionProvider]
        [--absent onnxruntime]

Fails the build (exit 1, a message per problem) when a package that has no place at runtime is
installed (torch, the code generators, what builds the model variants — onnx, sacrebleu and the
project's own export package — or `--absent` distributions such as the CPU onnxruntime wheel next
to onnxruntime-gpu), when onnxruntime lacks `--provider`, or when the server's modules
(the generated gRPC code included) do not import. Run it from outside the source tree, so that
the installed package is what gets imported. Standard library only, besides what it checks.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Sequence

# Modules that must not be importable at runtime: training (torch), code generation, and what builds
# the variants (the project's export package, onnx, sacrebleu: the builder's throwaway venv).
FORBIDDEN_MODULES = ("torch", "grpc_tools", "mypy_protobuf", "onnx", "sacrebleu", "export")
# The modules the server and the health check import, the generated gRPC code among them.
REQUIRED_MODULES = ("service.server", "service.client.cli", "service.api.translator.v1.translator_pb2_grpc")


def problems(provider: str | None, absent: Sequence[str]) -> list[str]:
    found = [f"{m} is installed" for m in FORBIDDEN_MODULES if importlib.util.find_spec(m) is not None]
    for dist in absent:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(f"the distribution {dist} {version} is installed")
    for module in REQUIRED_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as err:
            found.append(f"{module} does not import: {err}")
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    print(f"onnxruntime {onnxruntime.__version__} ({onnxruntime.__file__}): {', '.join(providers)}")
    if provider is not None and provider not in providers:
        found.append(f"onnxruntime has no {provider}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", default=None, help="an execution provider onnxruntime must have")
    parser.add_argument("--absent", action="append", default=[], help="a distribution that must be absent")
    args = parser.parse_args(argv)
    found = problems(args.provider, args.absent)
    for problem in found:
        print(f"check_runtime: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
