"""Split generation: held-out combinations, disjoint pseudo-name pools, cross-split dedup.

Evaluation splits are drawn first so that train can reject their English sentences; every split
has its own ``random.Random`` stream derived from the seed, so changing one split's size does not
change the others.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .combos import sentence_combos, structure_tags
from .config import CorpusConfig, Pair
from .english import realise_english
from .examples import known_pairs
from .french import realise_french
from .grammar import Grammar
from .heldout import HeldoutCombos, choose_heldout, heldout_sentence
from .lexicon import Lexicon, load_lexicon
from .pseudonames import pseudo_name_pools
from .structures import Sentence


def make_pair(sentence: Sentence) -> Pair:
    fr, tags = realise_french(sentence)
    return Pair(realise_english(sentence), fr, tags | structure_tags(sentence), sentence_combos(sentence))


def _word_list(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Closed-class words of both languages: a pseudo-name such as "Vous" or "Pour" would be ambiguous.
FUNCTION_WORDS = _word_list(
    "the a an and not do does is are am my your his her our their this these of to in with from at for "
    "one two three four five six seven eight nine ten they she we you "
    "le la les un une des du au aux de et ne pas que est-ce je il elle nous vous ils elles mon ma mes son sa "
    "ses votre vos notre nos leur leurs ce cet cette ces dans avec pour sans sous sur mais donc ou qui quoi "
    "deux trois quatre cinq sept huit neuf onze douze treize quatorze quinze seize vingt trente quarante "
    "cinquante soixante cent moi toi lui eux"
)


def reserved_words(lexicon: Lexicon) -> list[str]:
    """Every word a pseudo-name must not collide with."""
    words = [n.text for n in lexicon.names + lexicon.cities] + list(FUNCTION_WORDS)
    for noun in lexicon.nouns:
        words += [noun.en, noun.en_pl, noun.fr, noun.fr_pl]
    for adj in lexicon.adjectives:
        words += [adj.en, *adj.forms]
    for verb in lexicon.verbs:
        words += [verb.en_base, verb.fr_inf, *verb.forms]
    return words


class CorpusBuilder:
    def __init__(self, config: CorpusConfig) -> None:
        self.config = config
        self.lex = load_lexicon()
        pools = pseudo_name_pools(
            config.seed, (config.train_pseudo_names, config.eval_pseudo_names), reserved_words(self.lex)
        )
        self.train_names, self.eval_names = pools
        self.anchors = [make_pair(sentence) for sentence, _, _ in known_pairs(self.lex)]
        probe = Grammar(self.lex, (), random.Random(0))
        anchor_combos = {key for pair in self.anchors for key in pair.combos}
        self.heldout = choose_heldout(
            probe,
            config.seed,
            config.heldout_adjective_noun,
            config.heldout_subject_verb_object,
            anchor_combos,
        )
        self.banned = self.heldout.keys()
        self.used: set[str] = {pair.en for pair in self.anchors}  # English sentences taken by a split

    def grammar(self, split: str) -> Grammar:
        names = self.train_names if split in ("train", "valid") else self.eval_names
        return Grammar(self.lex, names, random.Random(f"{split}-{self.config.seed}"))

    def _draw(
        self, size: int, sample: Callable[[int], Pair], unique: bool, initial: tuple[Pair, ...] = ()
    ) -> list[Pair]:
        out: list[Pair] = list(initial)
        counts: dict[str, int] = {}
        for pair in initial:
            counts[pair.en] = counts.get(pair.en, 0) + 1
        attempts, limit = 0, 50 * size + 1000
        while len(out) < size:
            attempts += 1
            if attempts > limit:
                raise RuntimeError(f"could not draw {size} distinct sentences")
            pair = sample(attempts)
            seen = counts.get(pair.en, 0)
            if pair.en in self.used and seen == 0:
                continue
            if seen >= (1 if unique else self.config.max_train_duplicates):
                continue
            counts[pair.en] = seen + 1
            out.append(pair)
        self.used.update(counts)
        return out

    def regular_split(
        self, split: str, size: int, unique: bool = True, initial: tuple[Pair, ...] = ()
    ) -> list[Pair]:
        grammar = self.grammar(split)

        def sample(_: int) -> Pair:
            while True:
                pair = make_pair(grammar.sentence())
                if not pair.combos & self.banned:
                    return pair

        return self._draw(size, sample, unique, initial)

    def heldout_split(self, size: int) -> list[Pair]:
        grammar = self.grammar("heldout")

        def sample(index: int) -> Pair:
            # Held-out pairs record only the held-out combinations they contain.
            pair = make_pair(heldout_sentence(grammar, self.lex, self.heldout, index))
            combos = pair.combos & self.banned
            assert combos, pair.en
            return Pair(pair.en, pair.fr, pair.tags, combos)

        return self._draw(size, sample, True)

    def train_split(self) -> list[Pair]:
        anchors = tuple(self.anchors[: self.config.train_size])
        for pair in anchors:  # reserved for train: now counted as drawn once there
            self.used.discard(pair.en)
        rows = self.regular_split("train", self.config.train_size, unique=False, initial=anchors)
        random.Random(f"train-order-{self.config.seed}").shuffle(rows)
        return rows


def generate_corpus(config: CorpusConfig | None = None) -> dict[str, list[Pair]]:
    """Generate all four splits; identical config gives identical output in any process."""
    builder = CorpusBuilder(config or CorpusConfig())
    heldout = builder.heldout_split(builder.config.heldout_size)
    test = builder.regular_split("test", builder.config.test_size)
    valid = builder.regular_split("valid", builder.config.valid_size)
    train = builder.train_split()
    return {"train": train, "valid": valid, "test": test, "heldout": heldout}


def heldout_combinations(config: CorpusConfig | None = None) -> HeldoutCombos:
    return CorpusBuilder(config or CorpusConfig()).heldout
