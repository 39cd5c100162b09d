"""Public value types: the generation config and one sentence pair."""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "valid", "test", "heldout")


@dataclass(frozen=True)
class CorpusConfig:
    seed: int = 1234
    train_size: int = 300_000
    valid_size: int = 1_000
    test_size: int = 1_000
    heldout_size: int = 1_000
    heldout_adjective_noun: int = 60  # (adjective, noun) pairs never seen outside the held-out split
    heldout_subject_verb_object: int = 60  # (subject noun, verb, object noun) triples, likewise
    train_pseudo_names: int = 4_000  # pool shared by train and valid
    eval_pseudo_names: int = 600  # disjoint pool shared by test and held-out
    max_train_duplicates: int = 2  # an English sentence may occur at most this often in train

    def size(self, split: str) -> int:
        return {
            "train": self.train_size,
            "valid": self.valid_size,
            "test": self.test_size,
            "heldout": self.heldout_size,
        }[split]


@dataclass(frozen=True)
class Pair:
    en: str
    fr: str
    tags: frozenset[str] = field(default_factory=frozenset)  # phenomena (export/corpus/__init__.py)
    combos: frozenset[str] = field(default_factory=frozenset)  # an:adj|noun and svo:s|v|o keys
