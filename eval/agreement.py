"""How our grades agree with another judgement, for the verify step's report: the audit grader (`audit_grade`, an
independent normalised string / numeric comparison, deliberately not math-verify) and a published correctness flag
(`published_agreement`, e.g. OpenR1-Math-Raw's correctness_math_verify kept as `published_correct` by load's
explode)."""

from __future__ import annotations

import re

from eval.answers import Grade, last_boxed

# The audit grader: deliberately not math-verify. Answer = the last \boxed{...} after any </think>, else the
# last number; both sides normalised (LaTeX spacing and wrappers, thousands separators) and compared as
# numbers when both are numbers (fractions included), else as strings.
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\s+|\\text\{[^}]*\}|\.$")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_FRACTION = re.compile(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}|()(-?[\d.]+)/(-?[\d.]+)")


def normalised_answer(completion: str) -> str:
    """The audit grader's reading of a completion's final answer, normalised ("" if none)."""

    text = completion.rsplit("</think>", 1)[-1]
    boxed = last_boxed(text)
    if boxed is not None:
        return _normalise(boxed[boxed.index("{") + 1:-1])
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else ""


def _normalise(answer: str) -> str:
    answer = _LATEX_NOISE.sub("", answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    return answer.replace(",", "") if _NUMBER.fullmatch(answer) else answer


def _as_number(answer: str) -> float | None:
    try:
        return float(answer)
    except ValueError:
        pass
    match = _FRACTION.fullmatch(answer)
    if not match:
        return None
    sign, num, den = match.group(1, 2, 3) if match.group(2) else match.group(4, 5, 6)
    try:
        return (-1 if sign else 1) * float(num) / float(den)
    except (ValueError, ZeroDivisionError):
        return None


def audit_grade(completion: str, gold: str) -> tuple[bool, str]:
    """(correct by the audit grader, the answer it read)."""
    answer, gold = normalised_answer(completion), _normalise(str(gold))
    if not answer:
        return False, ""
    a, g = _as_number(answer), _as_number(gold)
    if a is not None and g is not None:
        return abs(a - g) <= 1e-6 * max(1.0, abs(g)), answer
    return answer == gold, answer


def published_agreement(grades: list[Grade], published: list) -> dict:
    """Our grades against a published correctness flag (`published_correct`, e.g. OpenR1-Math-Raw's
    correctness_math_verify): samples by (ours correct / incorrect / ungraded) x (published true / false / null).
    "Incorrect" is every graded label but correct; ungraded rows (eval.answers.UNGRADED) are kept apart."""
    table = {ours: {"true": 0, "false": 0, "null": 0} for ours in ("correct", "incorrect", "ungraded")}
    for grade, flag in zip(grades, published):
        ours = "ungraded" if not grade.graded else "correct" if grade.correct else "incorrect"
        table[ours]["null" if flag is None else "true" if flag else "false"] += 1
    agree = table["correct"]["true"] + table["incorrect"]["false"]
    compared = agree + table["correct"]["false"] + table["incorrect"]["true"]
    return {**table, "agreement": agree / compared if compared else None, "compared": compared}
