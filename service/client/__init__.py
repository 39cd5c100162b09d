"""The client layer: a synchronous Python client of translator.v1 and its command line.

`client` is the library (`TranslatorClient`: retries, deadlines, typed results), `cli` the
terminal front end, run as `python -m service.client`.
"""

from service.client.client import (
    Attention,
    ModelInfo,
    TranslateOptions,
    Translation,
    TranslationStream,
    TranslatorClient,
    TranslatorError,
)

__all__ = [
    "Attention",
    "ModelInfo",
    "TranslateOptions",
    "Translation",
    "TranslationStream",
    "TranslatorClient",
    "TranslatorError",
]
