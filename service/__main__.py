"""`python -m service [flags]`: the gRPC server (flags and TRANSLATOR_… variables: service/config.py)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from service.config import ConfigError, parse_config
from service.server import ListenError, serve, setup_logging
from service.workers import run_workers


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
    except (ListenError, ConfigError) as err:  # a port, or the TLS or token files
        print(f"python -m service: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
