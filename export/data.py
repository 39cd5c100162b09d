"""Tokenised parallel data for training: encoding, length-bucketed batches, padding.

Source ids end with the end token; the target is bos … eos, fed to the decoder shifted
by one (teacher forcing: input bos … x_n, expected output x_1 … eos).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from service.modeldir.tokenizer import Tokenizer


@dataclass(frozen=True)
class Example:
    src: list[int]  # source ids + eos
    tgt: list[int]  # bos + target ids + eos


@dataclass(frozen=True)
class Batch:
    src: Tensor  # (B, S) padded source ids
    tgt_in: Tensor  # (B, T) bos + target, padded
    tgt_out: Tensor  # (B, T) target + eos, padded


def encode_pairs(tokenizer: Tokenizer, pairs: list[tuple[str, str]], max_positions: int) -> list[Example]:
    """Tokenise pairs; pairs longer than `max_positions` on either side are dropped."""
    sp = tokenizer.special
    sources = tokenizer.encode_batch([en for en, _ in pairs])
    targets = tokenizer.encode_batch([fr for _, fr in pairs])
    examples = []
    for src, tgt in zip(sources, targets, strict=True):
        example = Example([*src, sp.eos], [sp.bos, *tgt, sp.eos])
        if len(example.src) <= max_positions and len(example.tgt) - 1 <= max_positions:
            examples.append(example)
    return examples


def bucketed_batches(examples: list[Example], max_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped into batches of similar lengths, each with at most `max_tokens` padded
    tokens (source + target), in a random order. Similar lengths waste little compute on padding."""
    order = list(range(len(examples)))
    rng.shuffle(order)  # random order among equal lengths
    order.sort(key=lambda i: (len(examples[i].src), len(examples[i].tgt)))
    batches: list[list[int]] = []
    current: list[int] = []
    longest_src = longest_tgt = 0
    for i in order:
        src_len, tgt_len = len(examples[i].src), len(examples[i].tgt)
        padded = (max(longest_src, src_len) + max(longest_tgt, tgt_len)) * (len(current) + 1)
        if current and padded > max_tokens:
            batches.append(current)
            current, longest_src, longest_tgt = [], 0, 0
        current.append(i)
        longest_src, longest_tgt = max(longest_src, src_len), max(longest_tgt, tgt_len)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def pad(sequences: list[list[int]], pad_id: int) -> Tensor:
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def collate(examples: list[Example], pad_id: int) -> Batch:
    return Batch(
        src=pad([e.src for e in examples], pad_id),
        tgt_in=pad([e.tgt[:-1] for e in examples], pad_id),
        tgt_out=pad([e.tgt[1:] for e in examples], pad_id),
    )
