"""What keeps math-verify bounded: `too_costly`, the checks that label an answer `timeout` before sympy sees it
(integer powers with more than MAX_POWER_DIGITS digits, brackets nested deeper than MAX_NESTING, an answer longer
than MAX_ANSWER_CHARS; see eval.answers' docstring for why each), and `OverTime`, what a worker's timer and these
checks raise. Split out of eval.answers: they read an answer's text only, never how it was extracted.
"""

from __future__ import annotations

import math
import re

MAX_ANSWER_CHARS = 1000  # a boxed answer longer than this is runaway output or garbage
MAX_NESTING = 10  # bracket depth; MATH-500 reference answers reach 3
MAX_POWER_DIGITS = 100_000  # 10^{100000} grades in well under a second; 10^{10^{7}} takes minutes


class OverTime(BaseException):
    """Grading ran out of time (a worker's SIGALRM) or would (`too_costly`). A BaseException, so that the broad
    `except Exception` in math-verify and sympy cannot swallow it and carry on."""


def too_costly(answer: str, *, boxed: bool = True) -> bool:
    """Whether math-verify may not finish on this answer text in bounded time (see the module docstring).

    `boxed`: the text is one answer, a \\boxed{}'s or a math environment's content; its length is capped too.
    (Environments read together with the text that joins them are checked for nesting and powers only.)
    """
    if boxed and len(answer) > MAX_ANSWER_CHARS:
        return True
    depth = 0
    for char in answer:
        if char in "{([":
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif char in "})]" and depth:
            depth -= 1
    return any(_power_digits(answer, caret.start()) > MAX_POWER_DIGITS for caret in re.finditer(r"\^", answer))


def _power_digits(text: str, caret: int) -> float:
    """Digits of the integer power whose ^ is at text[caret] (0 when base or exponent is not a plain number)."""
    base, exponent = _tower_log10(_base(text, caret)), _argument(text, caret + 1)
    digits = _power_log10(base, _tower_log10(exponent[0])) if base is not None and exponent else None
    return digits or 0.0


def _tower_log10(text: str | None) -> float | None:
    """log10 of a number written as an integer or a tower of integer powers ("10", "{2^{3^{4}}}"), or None."""
    text = (text or "").strip()
    if text.startswith("{"):
        group = _argument(text, 0)
        base, end = (_tower_log10(group[0]), group[1]) if group else (None, 0)
    else:
        number = re.match(r"0*(\d*)", text)
        digits, end = number.group(1), number.end()
        base = len(digits) - 1 + math.log10(int(digits[:15]) / 10 ** (min(len(digits), 15) - 1)) if digits else None
        if end and not digits:
            base = -math.inf  # zero
    rest = text[end:].lstrip()
    if base is None or not rest:
        return base
    exponent = _argument(rest, 1) if rest[0] == "^" else None
    if exponent is None or rest[exponent[1]:].strip():
        return None
    return _power_log10(base, _tower_log10(exponent[0]))


def _power_log10(base: float, exponent: float | None) -> float | None:
    """log10 of b^e from log10 b and log10 e (an infinite result for a huge e; 0 for b <= 1)."""
    if exponent is None:
        return None
    if base <= 0:
        return 0.0
    return base * 10 ** exponent if exponent < 300 else math.inf


def _argument(text: str, start: int) -> tuple[str, int] | None:
    """The TeX argument at text[start] (spaces skipped) -- a {group}'s content or one character -- and the
    index after it; None if there is none. Groups longer than MAX_ANSWER_CHARS are not looked into."""
    while start < len(text) and text[start].isspace():
        start += 1
    if start >= len(text):
        return None
    if text[start] != "{":
        return text[start], start + 1
    depth = 0
    for position in range(start, min(len(text), start + MAX_ANSWER_CHARS)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[start + 1:position], position + 1
    return None


def _base(text: str, caret: int) -> str | None:
    """What is raised to the power at text[caret]: the integer or {group} / (group) written just before it."""
    end = caret
    while end > 0 and text[end - 1].isspace():
        end -= 1
    start = end
    while start > 0 and text[start - 1].isdigit() and end - start < MAX_ANSWER_CHARS:
        start -= 1
    if start < end:
        return text[start:end]
    if not end or text[end - 1] not in "})":
        return None
    closing, opening = text[end - 1], {"}": "{", ")": "("}[text[end - 1]]
    depth = 0
    for position in range(end - 1, max(-1, end - 1 - MAX_ANSWER_CHARS), -1):
        depth += {closing: 1, opening: -1}.get(text[position], 0)
        if depth == 0:
            return text[position + 1:end - 1]
    return None


