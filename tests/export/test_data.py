"""export.data: encoding pairs, length-bucketed batches, padding and the teacher-forcing shift."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from export.data import Example, bucketed_batches, collate, encode_pairs, pad
from export.training.tokenizer import train_tokenizer
from service.modeldir.tokenizer import Tokenizer

PAIRS = [
    ("The cat sleeps.", "Le chat dort."),
    ("The dog sleeps.", "Le chien dort."),
    ("The cat eats the fish.", "Le chat mange le poisson."),
    ("The dog eats the bread.", "Le chien mange le pain."),
    ("I see the small house.", "Je vois la petite maison."),
    ("We see the big house.", "Nous voyons la grande maison."),
    ("She reads a book in the garden.", "Elle lit un livre dans le jardin."),
    ("He reads a letter in the kitchen.", "Il lit une lettre dans la cuisine."),
    ("The children play in the garden.", "Les enfants jouent dans le jardin."),
    ("Where is the station?", "Où est la gare ?"),
] * 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(PAIRS, vocab_size=300).save(str(path))
    return Tokenizer.from_file(path)


def random_examples(rng: random.Random, count: int) -> list[Example]:
    return [
        Example([4] * rng.randint(1, 20) + [2], [1] + [5] * rng.randint(0, 20) + [2]) for _ in range(count)
    ]


def padded_tokens(examples: list[Example], batch: list[int]) -> int:
    """Source + target tokens of a batch once padded to its longest source and longest target."""
    return len(batch) * (max(len(examples[i].src) for i in batch) + max(len(examples[i].tgt) for i in batch))


# --- encode_pairs ------------------------------------------------------------------------------


def test_tokenizer_special_ids(tokenizer: Tokenizer) -> None:
    sp = tokenizer.special
    assert (sp.pad, sp.bos, sp.eos, sp.unk) == (0, 1, 2, 3)


def test_encode_pairs_adds_end_and_start_tokens(tokenizer: Tokenizer) -> None:
    pairs = PAIRS[:10]
    examples = encode_pairs(tokenizer, pairs, max_positions=64)
    assert len(examples) == len(pairs)
    for (en, fr), example in zip(pairs, examples, strict=True):
        assert example.src == [*tokenizer.encode(en), 2]
        assert example.tgt == [1, *tokenizer.encode(fr), 2]
        assert tokenizer.decode(example.src) == en
        assert tokenizer.decode(example.tgt) == fr


def test_encode_pairs_drops_too_long_pairs(tokenizer: Tokenizer) -> None:
    short = ("The cat sleeps.", "Le chat dort.")
    n_en, n_fr = len(tokenizer.encode(short[0])), len(tokenizer.encode(short[1]))
    limit = max(n_en, n_fr) + 1  # the longer side of `short`, end token included, exactly fits
    long_en = (" ".join(["The cat sleeps."] * 4), "Le chat dort.")
    long_fr = ("The cat sleeps.", " ".join(["Le chat dort."] * 4))
    pairs = [long_en, short, long_fr, short]
    examples = encode_pairs(tokenizer, pairs, max_positions=limit)
    assert [e.src for e in examples] == [[*tokenizer.encode(short[0]), 2]] * 2
    assert encode_pairs(tokenizer, [short], max_positions=limit - 1) == []


def test_encode_pairs_target_limit_counts_the_decoder_input(tokenizer: Tokenizer) -> None:
    # The decoder reads bos + target (the end token is only predicted): that length must fit.
    en, fr = "Where is the station?", "Les enfants jouent dans le jardin."
    n_fr = len(tokenizer.encode(fr))
    assert len(tokenizer.encode(en)) + 1 <= n_fr + 1
    (example,) = encode_pairs(tokenizer, [(en, fr)], max_positions=n_fr + 1)
    assert len(example.tgt) == n_fr + 2
    assert encode_pairs(tokenizer, [(en, fr)], max_positions=n_fr) == []


# --- bucketed_batches --------------------------------------------------------------------------


def test_batches_cover_every_index_exactly_once() -> None:
    examples = random_examples(random.Random(1), 300)
    batches = bucketed_batches(examples, max_tokens=200, rng=random.Random(0))
    assert sorted(i for batch in batches for i in batch) == list(range(300))
    assert all(batch for batch in batches)
    assert 1 < len(batches) < 300


def test_batches_respect_max_tokens_when_lengths_grow_together() -> None:
    rng = random.Random(2)
    lengths = [rng.randint(1, 25) for _ in range(200)]
    examples = [Example([4] * n + [2], [1] + [5] * n + [2]) for n in lengths]
    batches = bucketed_batches(examples, max_tokens=150, rng=random.Random(0))
    for batch in batches:
        assert padded_tokens(examples, batch) <= 150
    # Similar lengths together: the batches' length ranges do not overlap (ties aside).
    ranges = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    for (_, high), (low, _) in itertools.pairwise(ranges):
        assert high <= low


def test_batches_respect_max_tokens_for_any_lengths() -> None:
    # Short source with a long target, then a longer source with a short target:
    # together they pad to 2 × (3 + 10) = 26 tokens, over a budget of 24.
    examples = [Example([4, 4, 2], [1, *[5] * 8, 2]), Example([4, 4, 4, 2], [1, 5, 2])]
    for batch in bucketed_batches(examples, max_tokens=24, rng=random.Random(0)):
        assert padded_tokens(examples, batch) <= 24 or len(batch) == 1
    examples = random_examples(random.Random(1), 300)
    for batch in bucketed_batches(examples, max_tokens=200, rng=random.Random(0)):
        assert padded_tokens(examples, batch) <= 200 or len(batch) == 1


def test_an_over_long_example_gets_a_batch_of_its_own() -> None:
    examples = [Example([4] * 5 + [2], [1, 5, 2]) for _ in range(6)]
    examples.insert(3, Example([4] * 40 + [2], [1] + [5] * 40 + [2]))  # 84 tokens > 30 alone
    batches = bucketed_batches(examples, max_tokens=30, rng=random.Random(0))
    assert [3] in batches
    assert sorted(i for batch in batches for i in batch) == list(range(7))
    for batch in batches:
        assert batch == [3] or padded_tokens(examples, batch) <= 30


def test_batches_are_deterministic_for_a_seed() -> None:
    examples = random_examples(random.Random(3), 200)
    first = bucketed_batches(examples, max_tokens=120, rng=random.Random(42))
    again = bucketed_batches(examples, max_tokens=120, rng=random.Random(42))
    other = bucketed_batches(examples, max_tokens=120, rng=random.Random(43))
    assert first == again
    assert first != other


def test_no_examples_no_batches() -> None:
    assert bucketed_batches([], max_tokens=100, rng=random.Random(0)) == []


# --- pad and collate ---------------------------------------------------------------------------


def test_pad() -> None:
    out = pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert out.dtype == torch.long
    assert out.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]


@pytest.mark.parametrize("pad_id", [0, 99])
def test_collate_shifts_the_target_and_pads(pad_id: int) -> None:
    examples = [
        Example([10, 11, 2], [1, 20, 21, 22, 2]),
        Example([12, 13, 14, 15, 2], [1, 23, 2]),
    ]
    batch = collate(examples, pad_id)
    p = pad_id
    assert batch.src.tolist() == [[10, 11, 2, p, p], [12, 13, 14, 15, 2]]
    assert batch.tgt_in.tolist() == [[1, 20, 21, 22], [1, 23, p, p]]
    assert batch.tgt_out.tolist() == [[20, 21, 22, 2], [23, 2, p, p]]
    # teacher forcing: the expected output at step t is the input at step t + 1
    for example, tgt_in, tgt_out in zip(examples, batch.tgt_in, batch.tgt_out, strict=True):
        n = len(example.tgt) - 1
        assert tgt_out[: n - 1].tolist() == tgt_in[1:n].tolist()
