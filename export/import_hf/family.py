"""What importing one checkpoint family produces: the plan the importer carries out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from export.model_config import TransformerConfig
from service.modeldir.manifest import Decoding, Languages


@dataclass(frozen=True)
class ImportPlan:
    cfg: TransformerConfig
    languages: Languages  # a bilingual model's pair; a multilingual one's default source, target ""
    write_tokenizer: Callable[[Path], str]  # writes the tokenizer files into a directory → its file
    decoding: Decoding | None = None  # None: this project's conventions (pad and start never generated)
    shared_table: bool = True  # the encoder's and decoder's tables are stored as one (model.shared)
