"""Cardinal numbers 1..100 as words in English and French (traditional French spelling).

French rules implemented: "et" joins the unit only for 21, 31, 41, 51, 61 and 71; hyphens join tens
and units otherwise; quatre-vingts takes its plural s only when nothing follows; cent is written
alone; "un" agrees in gender with the counted noun (une, vingt et une, quatre-vingt-une).
"""

from __future__ import annotations

_EN_UNITS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_EN_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")

_FR_UNITS = (
    "zéro",
    "un",
    "deux",
    "trois",
    "quatre",
    "cinq",
    "six",
    "sept",
    "huit",
    "neuf",
    "dix",
    "onze",
    "douze",
    "treize",
    "quatorze",
    "quinze",
    "seize",
    "dix-sept",
    "dix-huit",
    "dix-neuf",
)
_FR_TENS = ("", "", "vingt", "trente", "quarante", "cinquante", "soixante")


def english_number(n: int) -> str:
    if not 1 <= n <= 100:
        raise ValueError(f"number out of range: {n}")
    if n == 100:
        return "one hundred"
    if n < 20:
        return _EN_UNITS[n]
    tens, unit = divmod(n, 10)
    return _EN_TENS[tens] + ("" if unit == 0 else "-" + _EN_UNITS[unit])


def _french_masculine(n: int) -> str:
    if n == 100:
        return "cent"
    if n < 20:
        return _FR_UNITS[n]
    if n < 70:
        tens, unit = divmod(n, 10)
        if unit == 0:
            return _FR_TENS[tens]
        joiner = " et " if unit == 1 else "-"
        return _FR_TENS[tens] + joiner + _FR_UNITS[unit]
    if n < 80:
        # 70..79 count on from sixty with 10..19: soixante-dix, soixante et onze, soixante-douze.
        return "soixante" + (" et " if n == 71 else "-") + _FR_UNITS[n - 60]
    if n == 80:
        return "quatre-vingts"
    # 81..99: no "et", and vingt loses its s because something follows.
    return "quatre-vingt-" + _FR_UNITS[n - 80]


def french_number(n: int, feminine: bool = False) -> str:
    if not 1 <= n <= 100:
        raise ValueError(f"number out of range: {n}")
    words = _french_masculine(n)
    if feminine and (words == "un" or words.endswith((" un", "-un"))):
        return words + "e"
    return words


def is_feminine_form(n: int) -> bool:
    """True when the French number changes with a feminine noun (1, 21, 31, ..., 61, 81)."""
    return french_number(n, True) != french_number(n, False)
