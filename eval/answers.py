"""Answer extraction and labels: turns (completion, gold) into a Grade, in this process. The verify and evaluate
steps grade through eval.grading_pool, which runs `grade` in worker processes under a time limit.

Rules (DeepSeek-R1 / open-r1 / lighteval protocol):
- Only the text after the last `</think>` is read. A completion that opened `<think>` and never closed it, or
  that stopped at the token limit (finish_reason "length"), only counts a `\\boxed{}` answer: a number picked out
  of unfinished reasoning is not an answer.
- The last `\\boxed{}` wins. Without one, the answer is the last plain number, or the LaTeX math written after
  it (math-verify's plain-expression extraction would read "answer is 30 - 16 = 15" as 30 - 16).
- Golds: integers (AIME, AMC, GSM8K, "2,125" included) parse as numbers; anything else as LaTeX wrapped in
  `$...$` (MATH-500: unwrapped, many golds do not parse).
- `verify(gold, prediction)`, gold first (math-verify is not symmetric).

Labels. Graded: `correct`, `incorrect`, `no_answer` (nothing that reads as an answer), `truncated` (cut at the
token limit with no boxed answer). Ungraded (UNGRADED) -- the grader did not decide, so the sample says nothing
about the model: `bad_gold` (the gold answer does not parse), `timeout` (grading ran out of time, or would:
`too_costly`), `error` (grading raised; the exception is kept in `Grade.error`). One rule everywhere (pass rates in
verify, every score in evaluate): an ungraded sample leaves the denominator; a problem none of whose samples were
graded leaves the benchmark, for every model, and the report counts what each label removed.

Answers math-verify cannot grade in bounded time are labelled `timeout` at once (`too_costly`): integer powers
whose exact value has more than MAX_POWER_DIGITS digits (sympy evaluates 10^{10^{10}} exactly), brackets nested
deeper than MAX_NESTING (the LaTeX parser's time grows exponentially with depth: ~1 s at 10 levels, ~12 s at 14),
and a boxed answer longer than MAX_ANSWER_CHARS. Nothing in the MATH-500 reference answers comes near these limits.

Labels drift between math-verify versions (this was written against math-verify 0.9.0); pin it with
latex2sympy2_extended and antlr4-python3-runtime.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

GRADED = ("correct", "incorrect", "no_answer", "truncated")
UNGRADED = ("bad_gold", "timeout", "error")
LABELS = GRADED + UNGRADED

_INTEGER = re.compile(r"[-+]?(\d+|\d{1,3}(,\d{3})+)")
_BOXED = re.compile(r"\\(boxed|fbox)\s*\{")
# a number, decimal or fraction a/b; a minus right after a word or bracket is subtraction, not a sign
_NUMBER = re.compile(r"(?:(?<![\w.)\]])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_LATEX_MATH = re.compile(r"\$|\\\(|\\\[")
MAX_ANSWER_CHARS = 1000  # a boxed answer longer than this is runaway output or garbage
MAX_NESTING = 10  # bracket depth; MATH-500 reference answers reach 3
MAX_POWER_DIGITS = 100_000  # 10^{100000} grades in well under a second; 10^{10^{7}} takes minutes


@dataclass(frozen=True)
class Grade:
    label: str  # one of LABELS
    correct: bool
    extracted: str  # the answer as read from the completion ("" when none)
    error: str = ""  # label `error`: the exception grading raised

    @property
    def graded(self) -> bool:
        """Whether the grader decided (see UNGRADED): only graded samples count in any score."""
        return self.label not in UNGRADED


TIMEOUT = Grade("timeout", False, "")


def grade(completion: str | None, gold: str | None, *, gold_is_latex: bool | None = None,
          finish_reason: str | None = None) -> Grade:
    """Grade one completion against its gold answer, in this process, with no time limit.

    gold_is_latex: None = integers as numbers, anything else as LaTeX; True = always LaTeX; False = a plain
    expression. Use `grade_many` for untrusted text: a pathological expression can keep sympy busy for hours.
    """
    from math_verify import verify

    try:
        gold_parsed = _parse_gold(str(gold), gold_is_latex) if gold is not None else ()
        if not gold_parsed:
            return Grade("bad_gold", False, "")
        cut_short = finish_reason == "length"
        prediction = _parse_prediction(completion or "", cut_short)
        if not prediction:
            return Grade("truncated" if cut_short else "no_answer", False, "")
        extracted = next((p for p in prediction if isinstance(p, str)), str(prediction[0]))
        if verify(list(gold_parsed), prediction, timeout_seconds=None):
            return Grade("correct", True, extracted)
        return Grade("incorrect", False, extracted)
    except OverTime:
        return TIMEOUT


@functools.lru_cache(maxsize=4096)  # n samples per problem share one gold
def _parse_gold(gold: str, gold_is_latex: bool | None) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    gold = gold.strip()
    if gold_is_latex is None:
        gold_is_latex = not _INTEGER.fullmatch(gold)
    if gold_is_latex:
        text = gold if gold.startswith("$") or "\\boxed" in gold else f"${gold}$"
        config = [LatexExtractionConfig()]
    else:
        text, config = gold, [ExprExtractionConfig()]
    # no_fallback: a gold that yields no math object is bad_gold, not a string to compare verbatim
    return tuple(parse(text, config, fallback_mode="no_fallback", parsing_timeout=None))


def _parse_prediction(completion: str, cut_short: bool) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    thinking_unfinished = "<think>" in completion and "</think>" not in completion
    answer_text = completion.rsplit("</think>", 1)[-1]
    boxed = last_boxed(answer_text)
    if boxed is not None:
        if too_costly(boxed[boxed.index("{") + 1:-1]):
            raise OverTime
        prediction = parse(boxed, [LatexExtractionConfig(boxed_match_priority=0)], parsing_timeout=None)
        if prediction:
            return prediction
    if cut_short or thinking_unfinished:
        return []
    # No box: the last thing written, a plain number or LaTeX math ($...$, \(...\), \[...\]) after it.
    # Not math-verify's plain-expression extraction: from "the final answer is 30 - 16 = 15" it takes
    # "30 - 16", so restating the question would score.
    numbers = list(_NUMBER.finditer(answer_text))
    if numbers and not _LATEX_MATH.search(answer_text, numbers[-1].end()):
        return parse(numbers[-1].group(), [ExprExtractionConfig()], parsing_timeout=None)
    if too_costly(answer_text, boxed=False):
        raise OverTime
    return parse(answer_text, [LatexExtractionConfig()], parsing_timeout=None)



def answer_groups(answers: Sequence[str]) -> list[int]:
    """Group a problem's extracted answers by math-verify equivalence, in order: each answer joins the first group
    whose first answer it verifies equal to (gold first, as in grading), or starts a new one. Returns each
    answer's group number (0, 1, ...; -1 for "", which is no answer). Answers equal as text share a group
    without math. maj@k votes over these groups, so `\\frac{1}{2}`, `1/2` and `0.5` are one vote."""
    from math_verify import verify

    groups: list[int] = []
    firsts: list[tuple[str, tuple]] = []  # each group's first answer and its parse
    by_text: dict[str, int] = {}
    for answer in answers:
        if not answer:
            groups.append(-1)
            continue
        if answer not in by_text:
            parsed = () if too_costly(answer) else _parse_gold(answer, None)
            by_text[answer] = next((g for g, (_, first) in enumerate(firsts)
                                    if parsed and first and verify(list(first), list(parsed), timeout_seconds=None)),
                                   len(firsts))
            if by_text[answer] == len(firsts):
                firsts.append((answer, parsed))
        groups.append(by_text[answer])
    return groups

def last_boxed(text: str) -> str | None:
    """The last complete `\\boxed{...}` (or `\\fbox{...}`) in text, braces balanced; None if there is none."""
    closing: dict[int, int] = {}  # position of each "{" -> its "}", in one pass (long garbage stays linear)
    open_braces: list[int] = []
    for position, char in enumerate(text):
        if char == "{":
            open_braces.append(position)
        elif char == "}" and open_braces:
            closing[open_braces.pop()] = position
    for match in reversed(list(_BOXED.finditer(text))):
        end = closing.get(match.end() - 1)
        if end is not None:
            return text[match.start():end + 1]
    return None


class OverTime(BaseException):
    """Grading ran out of time (a worker's SIGALRM) or would (`too_costly`). A BaseException, so that the broad
    `except Exception` in math-verify and sympy cannot swallow it and carry on."""


def too_costly(answer: str, *, boxed: bool = True) -> bool:
    """Whether math-verify may not finish on this answer text in bounded time (see the module docstring).

    `boxed`: the text is the content of a \\boxed{}; its length is capped too. (Unboxed fallback text is the
    whole reply after </think>, which may be long; only its nesting and powers are checked.)
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


