"""Answers whose equality is not math-verify's: numerals written in a base (`1021_3`) and equations in a normal form
the problem imposes (`2x - 3y + z - 5 = 0`). eval.answers calls these after extracting the answer; each returns
None (or True) when the gold is not of its kind, so every other answer is left to math-verify.

Numerals in a base. math-verify drops a subscript (`52_9` verifies equal to `52_8`) and reads `\\text{52}_8` as a
symbol. When the gold is a numeral with a base subscript (`52_8`, `4210_{5}`, `\\text{1021}_3`), equal means the same
digits (leading zeros dropped, letters case-insensitive) and the same base. An answer with no subscript is read in
the gold's base: the problem asked for that base (`\\boxed{52}` is right for `52_8`). An answer in another base is
wrong even at the same value (`42_{10}` for `52_8`): the problem asked for base 8.

Normal forms. Problems such as "Enter your answer in the form Ax + By + Cz + D = 0, where A > 0 and gcd(|A|, |B|,
|C|, |D|) = 1" fix one equation among its multiples; math-verify accepts any multiple. The grader sees only the
gold, not the problem, so the gold decides: a gold `P = 0` whose P is a polynomial of two or more terms with integer
coefficients of gcd 1 is such a form, and an answer is right only when it is an equation whose lhs - rhs is P itself
(`2x - 3y + z = 5` is; `-4x + 6y - 2z + 10 = 0` and `-2x + 3y - z + 5 = 0` are not). Golds written otherwise
(`y = 2x + 3`) keep math-verify's equivalence.
"""

from __future__ import annotations

import functools
import re

# a numeral and its base: digits (or \text{digits}) and a subscript of one digit or a {group}
_NUMERAL = re.compile(r"(?:\\(?:text|mathrm|textrm)\s*\{\s*(?P<braced>[0-9A-Za-z]+)\s*\}|(?P<digits>[0-9A-Za-z]+))"
                      r"(?:\s*_\s*(?:\{\s*(?P<base>\d+)\s*\}|(?P<digit_base>\d)))?")
_WRAPPING = " \t\n$.,;"  # around an answer's text: math delimiters and sentence punctuation


def numeral(text: str) -> tuple[str, int | None] | None:
    """(digits, base) of a numeral such as `1021_3`, `1021_{3}`, `\\text{1021}_3` or (base None) `1021`; None if the
    text is not one, or its digits are not digits of its base."""
    match = _NUMERAL.fullmatch(text.strip(_WRAPPING))
    if not match:
        return None
    digits = (match.group("braced") or match.group("digits")).upper()
    base_text = match.group("base") or match.group("digit_base")
    base = int(base_text) if base_text else None
    if not any(char.isdigit() for char in digits) or base is not None and not 2 <= base <= 36:
        return None
    if any(int(char, 36) >= (base or 36) for char in digits):
        return None
    return digits.lstrip("0") or "0", base


@functools.lru_cache(maxsize=4096)  # n samples per problem share one gold
def gold_numeral(gold: str) -> tuple[str, int] | None:
    """The gold's (digits, base) when it is a numeral with a base subscript; None otherwise."""
    parsed = numeral(gold) if "_" in gold else None
    return parsed if parsed and parsed[1] is not None else None


def same_numeral(gold: tuple[str, int], answer: str) -> bool:
    """Whether the extracted answer (or a side of it when it is an equation: `S = 1021_3`, `1021_3 = 34_{10}`) is the
    gold numeral: same digits, and the same base or none (see above)."""
    for side in answer.split("="):
        parsed = numeral(side)
        if parsed is not None and parsed[0] == gold[0] and parsed[1] in (None, gold[1]):
            return True
    return False


def _normal_form(gold) -> object | None:
    """P of a gold `P = 0` in a normal form (see the module docstring), or None. (Not cached: a parsed gold may be
    unhashable, a matrix; only equations reach sympy.Poly, and they are small.)"""
    import sympy

    if not isinstance(gold, sympy.Equality) or gold.rhs != 0 or not gold.lhs.free_symbols:
        return None
    try:
        poly = sympy.Poly(gold.lhs, *sorted(gold.lhs.free_symbols, key=str))
    except sympy.PolynomialError:
        return None
    coefficients = poly.coeffs()
    if len(coefficients) < 2 or not all(c.is_Integer for c in coefficients):
        return None
    return gold.lhs if sympy.gcd_list(coefficients) == 1 else None


def keeps_normal_form(gold: tuple, prediction: list) -> bool:
    """False when the gold is an equation in a normal form and the answer is not that same equation: a multiple, the
    negation, or not an equation (see the module docstring); True otherwise."""
    import sympy

    form = _normal_form(gold[0]) if gold else None
    if form is None:
        return True
    answer = prediction[0] if prediction else None
    if not isinstance(answer, sympy.Equality):
        return False
    return sympy.expand(answer.lhs - answer.rhs - form) == 0
