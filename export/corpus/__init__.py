"""Deterministic synthetic English→French parallel corpus.

Both sides are realised from one sentence structure built from a hand-written lexicon
(``lexicon/*.tsv``) and grammar, so every French sentence is a correct, unique translation.

Tags (``Pair.tags``) name the phenomena a pair exhibits. Produced by the French realiser:
elision, contraction_au, contraction_aux, contraction_du, contraction_des, demonstrative,
demonstrative_cet, possessive, possessive_mon_feminine, preposed_adjective, postposed_adjective,
liaison_adjective, predicative_adjective, indefinite_de_adjective, generic_plural_definite,
generic_mass_definite, partitive, negation, negation_de, question, number, number_feminine, name,
pseudo_name, city, irregular_verb, spelling_change, irregular_plural, h_muet, preposition_a,
preposition_dans, preposition_avec, preposition_de. From the structure: coordination,
coordination_subject, coordination_object, coordination_clause, mixed_gender_agreement,
coordination_agreement, phrasal_verb, frame_<tr|intr|ditr|io|goal|source|loc|cop_adj|cop_loc>.

Combinations (``Pair.combos``): ``an:<adjective>|<noun>`` and ``svo:<subject>|<verb>|<object>``
with English lemmas; held-out pairs list only the held-out combinations they contain.
"""

from .config import CorpusConfig, Pair
from .splits import generate_corpus
from .storage import read_pairs, write_corpus

__all__ = ["CorpusConfig", "Pair", "generate_corpus", "read_pairs", "write_corpus"]
