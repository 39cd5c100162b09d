"""`python -m service [flags]`: the gRPC server (flags and TRANSLATOR_… variables: service/config.py)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from service.config import ConfigError, parse_config
from service.server import STARTUP_ERRORS, serve, setup_logging
from service.workers import WorkerStartupError, run_workers

# A setup that cannot be served (server.STARTUP_ERRORS, or a worker's): one line, exit 1, no traceback.
_STARTUP_ERRORS: tuple[type[Exception], ...] = (*STARTUP_ERRORS, WorkerStartupError)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # the one place that reads the environment
        config = parse_config(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as err:
        print(f"python -m service: {err}", file=sys.stderr)
        return 2
    setup_logging(config.server)
    try:
        if config.server.workers > 1:
            return run_workers(config)
        asyncio.run(serve(config))
    except _STARTUP_ERRORS as err:
        print(f"python -m service: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
