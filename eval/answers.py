"""Answer extraction and labels: turns (completion, gold) into a Grade, in this process. The verify and evaluate
steps grade through eval.grading_pool, which runs `grade` in worker processes under a time limit. Over 400 lines as
one thing: the extraction rules below build on each other (an answer statement's cue, its math, its words, the
unfinished-reply checks) and are read together when a grade is questioned. What does not depend on them is split
out: the cost checks (eval.answer_costs) and the answers whose equality is not math-verify's (eval.answer_forms).

Rules (DeepSeek-R1 / open-r1 / lighteval protocol):
- Only the text after the last `</think>` is read. A completion that opened `<think>` and never closed it, or
  that stopped at the token limit (finish_reason "length"), only counts a `\\boxed{}` answer: a number picked out
  of unfinished reasoning is not an answer. Nor is a box such a trace computed on from (more math after it, no answer
  cue before it: "the intermediate value is \\boxed{17}. ... 84 - 3 = "), nor a box before one the reply opened and
  never closed (it was cut inside its final answer).
- The last `\\boxed{}` wins. Without one, the answer is the math of the last answer statement ("the final answer
  is", "answer:", "the solution is"; not the echoed instruction "put your final answer within \\boxed{}"): the
  expression its first math starts ("30 - 16 = 14" reads 14, "126 is the product of 21 and 6" reads 126), whatever a
  check after it computes ("the answer is the sum of 17 and 25, which is 42" reads the result after the operands);
  without one, the last math written, or the math that operands named after it follow ("So 42 is the sum of 17 and
  25." reads 42), unless it is an expression still being written or a task restated ("now add 42 + 8", "So we need
  to compute $8 \\cdot 8$."). A numeral keeps its base subscript ("1021_3", not 1021 and then 3). Math is a plain number, a tuple or interval of plain
  numbers, or a LaTeX math environment ($...$, $$...$$, \\(...\\), \\[...\\]; the numbers inside one are part of it,
  and environments joined by "and", "or" or commas are read together, as math-verify reads them). An answer in words
  counts too: up to three words right after an answer statement's cue ("the final answer is east"), or the one word
  that ends a concluding last sentence with no math ("Therefore, the winner is Evelyn."). Not math-verify's
  plain-expression extraction: it would read "answer is 30 - 16 = 15" as 30 - 16, so restating the question would
  score.
- A reply that stops mid-derivation has no answer: one that ends inside an equation (on an operator, "=", an opened
  math environment or box), or one that ends in a sentence (or line) it never finished, unless an answer statement
  gives the answer (not "Let me compute 6*7 = 42 and then": the computation under way, issue 27). A closing sign-off with no math ("I think that's right", "Let me
  know if you have any other questions"), period or not, is dropped first: it leaves nothing unfinished. Math in a
  question is not an answer either ("What is $30 - 16$?").
- Noise around an answer is dropped before parsing: ordinal suffixes (`12^{\\mathrm{th}}`) and punctuation that ends
  the sentence inside the math (`$(2, -1, 2).$`). Units after a number are math-verify's (`12 \\text{ grade}` = 12).
- Golds: integers (AIME, AMC, GSM8K, "2,125" included) parse as numbers; a bare word ("east") as `\\text{east}`
  (as LaTeX, `east` is the product e·a·s·t, equal to "seat"); anything else as LaTeX wrapped in `$...$`
  (MATH-500: unwrapped, many golds do not parse).
- `verify(gold, prediction)`, gold first (math-verify is not symmetric); except for a gold numeral in a base (same
  digits and base) and a gold equation in a normal form (that equation, not a multiple): eval.answer_forms.

Only the answer is parsed. Reasoning traces run to 100k characters; the answer is found by plain string and regex
scans (the last box from the end; math and numbers in one pass) and only its text goes to math-verify and sympy.

Labels. Graded: `correct`, `incorrect`, `no_answer` (nothing that reads as an answer), `truncated` (cut at the
token limit with no boxed answer). Ungraded (UNGRADED) -- the grader did not decide, so the sample says nothing
about the model: `bad_gold` (the gold answer does not parse), `no_majority` (verify `label: majority`: the
problem's samples agreed on no answer), `timeout` (grading ran out of time, or would:
`too_costly`), `error` (grading raised; the exception is kept in `Grade.error`). One rule everywhere (pass rates in
verify, every score in evaluate): an ungraded sample leaves the denominator; a problem none of whose samples were
graded leaves the benchmark, for every model, and the report counts what each label removed.

Answers math-verify cannot grade in bounded time are labelled `timeout` at once (`too_costly`): integer powers
whose exact value has more than MAX_POWER_DIGITS digits (sympy evaluates 10^{10^{10}} exactly), brackets nested
deeper than MAX_NESTING (the LaTeX parser's time grows exponentially with depth: ~1 s at 10 levels, ~12 s at 14),
and a boxed answer (or a final math environment) longer than MAX_ANSWER_CHARS. Nothing in the MATH-500 reference
answers comes near these limits.

Labels drift between math-verify versions (this was written against math-verify 0.9.0); pin it with
latex2sympy2_extended and antlr4-python3-runtime.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from eval import answer_forms
from eval.answer_costs import MAX_ANSWER_CHARS, MAX_NESTING, MAX_POWER_DIGITS, OverTime, too_costly  # noqa: F401

GRADED = ("correct", "incorrect", "no_answer", "truncated")
UNGRADED = ("bad_gold", "no_majority", "timeout", "error")  # no_majority: verify `label: majority` found none
LABELS = GRADED + UNGRADED

_INTEGER = re.compile(r"[-+]?(\d+|\d{1,3}(,\d{3})+)")
_WORD = re.compile(r"[A-Za-z]{3,}")  # a gold that is one word: a text answer, not a product of variables
_BOXED = re.compile(r"\\(boxed|fbox)\s*\{")
# The math an answer can be, in one pass: environments first (the numbers inside them are theirs), display ones
# across lines, inline ones on one line as math-verify reads them; then a tuple or interval of plain numbers
# ("(2, -1, 2)", "[2, 5)"; not a function's arguments); then a plain number, decimal or fraction a/b (a minus right
# after a word or bracket is subtraction, not a sign), with a base subscript if it has one ("1021_3", "1021_{3}": a
# numeral, not 1021 and then its base). Each environment's content is a named group. An environment
# cannot contain its own opening delimiter, so an unclosed one is scanned only up to the next: one pass, even on
# garbage ("\[" 25,000 times).
_PLAIN_NUMBER = r"(?:(?<![\w.)\]])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+|_(?:\d|\{\d+\}))?"
_MATH = re.compile(
    r"\$\$(?P<display_dollar>(?:[^$]|\$(?!\$))+?)\$\$"
    r"|\\\[(?P<display_bracket>(?:[^\\]|\\\\|\\(?![\[\]]))+?)\\\]"
    r"|\\\((?P<inline_parenthesis>(?:[^\\\n]|\\\\|\\(?![()]))+?)\\\)"
    r"|(?<!\\)\$(?P<inline_dollar>(?:\\\$|[^\n$])+?)(?<!\\)\$"
    r"|(?P<plain_tuple>(?<![\w\\])[(\[] *-?\d+(?:\.\d+)?(?: *, *-?\d+(?:\.\d+)?)+ *[)\]])"
    rf"|(?P<number>{_PLAIN_NUMBER})")
_JOINED = re.compile(r"\s*(?:,?\s*and|,?\s*or|,)\s*")  # between environments that math-verify reads as one answer
# A statement of the answer: "the final answer is", "answer:", "the solution is", or "Final Answer" right before math
# or a line break (a heading). Its math is the answer, whatever math a check after it writes. "put your final answer
# within \boxed{}" (the instruction, echoed) states nothing.
_ANSWER_CUE = re.compile(r"\b(?:(?:final\s+)?answer|solution)(?:\s+is\b|\s*:)"
                         r"|\bfinal\s+answer\b(?=[\s*_#]*(?:\n|\$|\\[(\[]|-?\d))", re.IGNORECASE)
# What may stand between the numbers of one expression in a statement ("30 - 16 = 14", "2 \cdot 5"): the statement's
# answer is the last number of the expression its first math starts, not of the sentence ("126 is the product of 21
# and 6")
_OPERATORS = re.compile(r"(?:\s|[-+*/=^×÷·<>]|\\(?:cdot|times|div|pm|approx|le|ge|neq)\b)*")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
# operands named right after an answer ("42 is the sum of 17 and 25", "42, which is the product of 6 and 7"): the
# answer is the math before them, not the operands' last number; right after a cue ("the answer is the sum of 17 and
# 25, which is 42") the answer is the sentence's last math, the result after the operands
_OPERATION = r"the\s+(?:sum|product|difference|quotient|ratio|result|total|combination)\s+of\b"
_NAMES_OPERANDS = re.compile(r"[\s,]*(?:(?:which|that)\s+)?(?:is\s+|being\s+|equals\s+)?(?:just\s+|simply\s+)?"
                             + _OPERATION, re.IGNORECASE)
_OPERANDS_FIRST = re.compile(r"\s*(?:just\s+|simply\s+)?" + _OPERATION, re.IGNORECASE)
# a sign-off closing a reply, with or without its period: not a sentence left unfinished, and no answer
_SIGN_OFF = re.compile(r"(?:(?<=[.!?:])[ \t]+|\n\s*)(?:(?:I\s+(?:think|believe|hope)\s+(?:that|this|it)(?:['’]s|\s+is)\s+"
                       r"(?:\w+\s+)?(?:right|correct)|I\s+hope\s+(?:this|that|it)\s+helps|Hope\s+(?:this|that|it)\s+helps"
                       r")[\s.!:)]*|(?:Let\s+me\s+know\s+if|Feel\s+free\s+to|Thanks?\s+for|Good\s+luck)\b"
                       r"[^$\\\d=\n.!?]{0,60}[.!?]?\s*)$", re.IGNORECASE)  # no work after it: "right, but let me check"
SIGN_OFF_CHARS = 300  # how far from the end _SIGN_OFF looks
# the last number of a reply that is an operand of an expression it was still writing ("now add 42 + 8"), not a result
_OPERAND_BEFORE = re.compile(r"(?:\s-|[+*/^×÷·]|\\(?:cdot|times|div))\s*$")  # "5-10" is a range, "42 - 8" not
# a box stated as the answer without a cue: "should be \boxed{42}", "Therefore, \boxed{42}", "\boxed{42} is the answer"
_STATED_BEFORE = re.compile(r"(?:\b(?:should|must)\s+be|(?:^|[.!?:]\s|\n)\s*(?:Therefore|Thus|Hence|So)\b,?)[\s$\\(\[]*$",
                            re.IGNORECASE)
_STATED_AFTER = re.compile(r"[\s$\\)\]]*(?:(?:is|as)\s+(?:the|my|our)\s+(?:final\s+)?answer|for\s+the\s+final\s+answer)\b",
                           re.IGNORECASE)
# a computation written out: "12 * 7 = 84", "2 \cdot 5 + 3 = 13"
_COMPUTATION = re.compile(r"\d\s*(?:[-+*/^×÷·]|\\(?:cdot|times|div))\s*\d+\s*=")
# a reply that ends by naming a computation to do ("So we need to compute $8 \cdot 8$."): the task, not its result
_TASK_BEFORE = re.compile(r"\b(?:compute|calculate|evaluate|simplify|find)\s*$", re.IGNORECASE)
_LINE_END = re.compile(r"[.!?](?=\s|$)|\n")  # derivations write one equation a line, often with no period
RESULT_WORDS_CHARS = 40  # how far before an answer the words that state it are looked for
# Answers in words: up to three words right after an answer statement's cue that end the sentence ("the final answer
# is east", "**Answer:** (C)"), or one word ending a concluding last sentence with no math ("Therefore, the person
# who finishes first is Evelyn.").
_WORDS = r"[\s*_]*(?P<words>\(?[A-Za-z]+\)?%s)[*_]*\s*"
_STATED_WORDS = re.compile(_WORDS % r"(?:[ -][A-Za-z]+){0,2}" + r"(?:[.!]|$)")
_CONCLUDING_WORD = re.compile(r"(?:^|[.!?]\s|\n)\s*(?:Therefore|Thus|Hence|So|Finally|In conclusion)\b[^.!?\n$\\\d]*?"
                              r"\b(?:is|are|was|with)" + _WORDS % "" + r"[.!]?[\s*_]*$")
# words in those places that judge an answer given before rather than give one
_NOT_AN_ANSWER = {"correct", "right", "confirmed", "verified", "valid", "consistent", "complete", "done", "solved",
                  "satisfied", "indeed", "clear", "obvious", "above", "below", "as follows", "the same", "unchanged"}
# a reply that stops here stopped inside an equation: an operator, an opened bracket or a LaTeX command (a * or _
# right after a word closes markdown emphasis: "**42**")
_DANGLING = re.compile(r"(?:(?<=\s)[*_]|[-+/=^({\[&\\]|\\[A-Za-z]+)\s*$")
_OPENS_MATH = re.compile(r"\$|\\\(|\\\[")
_CLOSING_MARKUP = " \t\n*_\"')]}"  # what a finished sentence may end with after its punctuation
# noise around an answer that math-verify would read as math: an ordinal suffix after a number (12th, 12^{th},
# 12^{\mathrm{th}}, 12^{\rm th}, 12\text{th}), and punctuation or spacing that ends the sentence inside the math
# ("$(2, -1, 2).$")
_SUFFIX = r"(?:st|nd|rd|th)"
_TEXT_SUFFIX = rf"\\(?:mathrm|text|textrm|textsuperscript)\s*\{{\s*{_SUFFIX}\s*\}}"
_ORDINAL = re.compile(rf"(?<=\d)\s*(?:\^\s*(?:\{{\s*(?:{_TEXT_SUFFIX}|(?:\\rm\s*)?{_SUFFIX})\s*\}}|{_TEXT_SUFFIX})"
                      rf"|{_TEXT_SUFFIX}|{_SUFFIX}\b)")
_TRAILING_PUNCTUATION = re.compile(r"(?:\s|\\[,;:! ]|\\q?quad\b|[.,;:])+$")


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
        numeral = answer_forms.gold_numeral(str(gold))
        if numeral is not None:  # a numeral in a base: digits and base, not math-verify's value (eval.answer_forms)
            right = answer_forms.same_numeral(numeral, extracted)
        else:
            right = verify(list(gold_parsed), prediction, timeout_seconds=None) and answer_forms.keeps_normal_form(
                gold_parsed, prediction)
        return Grade("correct", True, extracted) if right else Grade("incorrect", False, extracted)
    except OverTime:
        return TIMEOUT


@functools.lru_cache(maxsize=4096)  # n samples per problem share one gold
def _parse_gold(gold: str, gold_is_latex: bool | None) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    gold = gold.strip()
    if gold_is_latex is None:
        gold_is_latex = not _INTEGER.fullmatch(gold)
    if gold_is_latex:
        if _WORD.fullmatch(gold):
            text = f"$\\text{{{gold}}}$"
        elif gold.startswith("$") or "\\boxed" in gold:
            text = gold
        else:
            text = f"${gold}$"
        config = [LatexExtractionConfig()]
    else:
        text, config = gold, [ExprExtractionConfig()]
    # no_fallback: a gold that yields no math object is bad_gold, not a string to compare verbatim
    return tuple(parse(text, config, fallback_mode="no_fallback", parsing_timeout=None))


def _parse_prediction(completion: str, cut_short: bool) -> list:
    from math_verify import LatexExtractionConfig, parse

    thinking_unfinished = "<think>" in completion and "</think>" not in completion
    answer_text = completion.rsplit("</think>", 1)[-1]
    box = _last_box(answer_text)
    if box is not None:
        start, end, last_opened = box
        if not last_opened or (cut_short or thinking_unfinished) and _computed_on(answer_text, start, end):
            return []  # cut inside a later box (its final answer), or the box was a step of a cut derivation
        content = answer_text[answer_text.index("{", start) + 1:end - 1]
        if too_costly(content):
            raise OverTime
        prediction = parse(f"\\boxed{{{_without_noise(content)}}}", [LatexExtractionConfig(boxed_match_priority=0)],
                           parsing_timeout=None)
        if prediction:
            return prediction
    if cut_short or thinking_unfinished:
        return []
    return _parse_unboxed(answer_text)


def _parse_unboxed(answer_text: str) -> list:
    """The answer of a reply with no box (see the module docstring), parsed; [] when it has none. Only the answer's
    own text reaches math-verify: one regex pass over the reply finds its math."""
    sign_off = _SIGN_OFF.search(answer_text, max(0, len(answer_text) - SIGN_OFF_CHARS))
    if sign_off:
        answer_text = answer_text[:sign_off.start()]
    math_items = list(_MATH.finditer(answer_text))
    last_math = math_items[-1] if math_items else None
    last_math_end = last_math.end() if last_math else 0
    if _stopped_inside_math(answer_text, last_math_end):
        return []
    unfinished_from = _unfinished_sentence_start(answer_text, last_math_end)
    answer_from = unfinished_from or 0  # an answer before a sentence left unfinished is none
    cue = None
    for cue in _ANSWER_CUE.finditer(answer_text, answer_from):
        pass
    if cue:
        stated = _statement_math(answer_text, math_items, cue.end())
        if stated is not None and _OPERANDS_FIRST.match(answer_text, cue.end()):
            stated = _sentence_last_math(answer_text, math_items, stated)
        if stated is not None:
            return _parse_math(answer_text, math_items, stated)
        words = _STATED_WORDS.match(answer_text, cue.end())
        if words and words.group("words").lower() not in _NOT_AN_ANSWER:
            return _parse_words(words.group("words"))
    words = _CONCLUDING_WORD.search(answer_text)
    if words and words.group("words").lower() not in _NOT_AN_ANSWER and words.start() >= last_math_end:
        return _parse_words(words.group("words"))
    if not last_math or last_math.start() < answer_from or _in_question(answer_text[last_math_end:]):
        return []
    if unfinished_from is not None:
        return []  # cut mid-sentence with no answer statement: its numbers are the computation under way
    if _unevaluated(answer_text, last_math):
        return []
    return _parse_math(answer_text, math_items, _before_operands(answer_text, math_items))


def _computed_on(answer_text: str, box_start: int, box_end: int) -> bool:
    """Whether a cut trace's last box was a step of the derivation: not stated as the answer (no answer cue right
    before it) and followed by more computation ("the intermediate value is \\boxed{17}. Then 12 * 7 = 84"; a figure's
    code after a solution's final box, "[asy] size(5cm); dot((0,1));", computes nothing)."""
    before_from = max(0, box_start - RESULT_WORDS_CHARS)
    stated = (_ANSWER_CUE.search(answer_text, before_from, box_start) or _STATED_BEFORE.search(
        answer_text, before_from, box_start) or _STATED_AFTER.match(answer_text, box_end))
    return stated is None and _COMPUTATION.search(answer_text, box_end) is not None


def _sentence_last_math(answer_text: str, math_items: list[re.Match], index: int) -> int:
    """Index of the last math in the sentence (or line) that holds math_items[index]."""
    while index + 1 < len(math_items) and not _LINE_END.search(answer_text, math_items[index].end(),
                                                                 math_items[index + 1].start()):
        index += 1
    return index


def _before_operands(answer_text: str, math_items: list[re.Match]) -> int:
    """Index of the reply's answer among its math when it has no answer statement: the last math, or the math of the
    last sentence that the operands named after it follow ("So 42 is the sum of 17 and 25." reads 42)."""
    index = len(math_items) - 1
    while index >= 0:
        if _NAMES_OPERANDS.match(answer_text, math_items[index].end()):
            return index
        if not index or _LINE_END.search(answer_text, math_items[index - 1].end(), math_items[index].start()):
            break
        index -= 1
    return len(math_items) - 1


def _unevaluated(answer_text: str, last_math: re.Match) -> bool:
    """Whether the reply's last math is an expression it was still writing or a task it restates, not a result: a
    number right after an operator ("now add 42 + 8"), or math with no "=" right after "compute" ("So we need to
    compute $8 \\cdot 8$.")."""
    before = answer_text[max(0, last_math.start() - RESULT_WORDS_CHARS):last_math.start()]
    if last_math.lastgroup == "number":
        return bool(_OPERAND_BEFORE.search(before))
    return bool(_TASK_BEFORE.search(before.rstrip("$\\[( "))) and "=" not in last_math.group()


def _stopped_inside_math(answer_text: str, last_math_end: int) -> bool:
    """Whether the reply stopped inside an equation (on an operator, an opened bracket or math environment, after its
    last math) or inside a box."""
    after = answer_text[last_math_end:]
    if _DANGLING.search(after) or _OPENS_MATH.search(after):
        return True
    opened_box = None
    for opened_box in _BOXED.finditer(answer_text):
        pass
    return opened_box is not None and last_boxed(answer_text[opened_box.start():]) is None


def _unfinished_sentence_start(answer_text: str, last_math_end: int) -> int | None:
    """Where the reply's last sentence (or line) starts if the reply stops before ending it (not on punctuation, not
    on its last math); None if it ends one. A reply cut mid-sentence stopped mid-derivation: only that sentence can
    hold its answer, and only as a result it states ("6*7 = 42 and then")."""
    end = len(answer_text.rstrip(_CLOSING_MARKUP))
    if end <= last_math_end or answer_text[end - 1] in ".!?":
        return None
    start = 0
    for line_end in _LINE_END.finditer(answer_text, 0, end):
        start = line_end.end()
    return start


def _statement_math(answer_text: str, math_items: list[re.Match], cue_end: int) -> int | None:
    """Index in `math_items` of the last math of the answer statement whose cue ends at cue_end: the first math after
    the cue and what continues it (`_continues`); the first may stand on a line of its own ("**Answer:**\\n\\n$$42$$").
    None if the sentence ends before any math."""
    first = bisect.bisect_left([item.start() for item in math_items], cue_end)
    if first == len(math_items) or _SENTENCE_END.search(answer_text, cue_end, math_items[first].start()):
        return None
    last = first
    while last + 1 < len(math_items) and _continues(answer_text, math_items[last], math_items[last + 1]):
        last += 1
    return last


def _continues(answer_text: str, item: re.Match, following: re.Match) -> bool:
    """Whether `following` belongs to the same answer as `item` in a statement: the next number of one expression
    ("30 - 16 = 14"), or math joined to math by "and", "or" or commas ("$x = 2$ and $x = 3$")."""
    gap_start, gap_end = item.end(), following.start()
    if _OPERATORS.fullmatch(answer_text, gap_start, gap_end):
        return True
    environments = item.lastgroup not in ("number", "plain_tuple") and following.lastgroup not in ("number",
                                                                                                     "plain_tuple")
    return environments and bool(_JOINED.fullmatch(answer_text, gap_start, gap_end))


def _in_question(after_last_math: str) -> bool:
    """Whether the sentence holding a reply's last math is a question ("What is $30 - 16$?"): not an answer."""
    line_end = _LINE_END.search(after_last_math)
    return line_end is not None and line_end.group() == "?"


def _parse_math(answer_text: str, math_items: list[re.Match], index: int) -> list:
    """math_items[index] parsed: a number as a plain expression, anything else as LaTeX; an environment together with
    those joined to it by "and", "or" or commas ("$x = 2$ and $x = 3$"), read as math-verify reads them."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    last = math_items[index]
    if last.lastgroup == "number" and "_" not in last.group():
        return parse(last.group(), [ExprExtractionConfig()], parsing_timeout=None)
    if last.lastgroup in ("plain_tuple", "number"):  # a number with a base subscript is LaTeX
        return parse(f"${last.group()}$", [LatexExtractionConfig()], parsing_timeout=None)
    first = index
    while first and math_items[first - 1].lastgroup not in ("number", "plain_tuple") and _JOINED.fullmatch(
            answer_text, math_items[first - 1].end(), math_items[first].start()):
        first -= 1
    content = last.lastgroup
    if too_costly(last.group(content)):
        raise OverTime
    answer = (answer_text[math_items[first].start():last.start(content)] + _without_noise(last.group(content))
              + answer_text[last.end(content):last.end()])
    if too_costly(answer, boxed=False):
        raise OverTime
    return parse(answer, [LatexExtractionConfig()], parsing_timeout=None)


def _parse_words(words: str) -> list:
    from math_verify import LatexExtractionConfig, parse

    return parse(f"$\\text{{{words}}}$", [LatexExtractionConfig()], parsing_timeout=None)


def _without_noise(answer: str) -> str:
    """An answer's LaTeX without ordinal suffixes and sentence-ending punctuation (see the module docstring)."""
    return _TRAILING_PUNCTUATION.sub("", _ORDINAL.sub("", answer))


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
    """The last complete `\\boxed{...}` (or `\\fbox{...}`) in text, braces balanced; None if there is none.

    Read from the end: each box is scanned only up to where it closes, or up to the brace of a later box that never
    closes (a box opened before an unclosed brace cannot close either), so a long trace costs one pass at most."""
    box = _last_box(text)
    return text[box[0]:box[1]] if box else None


def _last_box(text: str) -> tuple[int, int, bool] | None:
    """Start and end of the last complete box in text (see last_boxed), and whether it is the last box opened (False:
    a later one never closes); None if there is none."""
    unclosed_from = len(text)
    for match in reversed(list(_BOXED.finditer(text))):
        opening = match.end() - 1
        depth = 0
        for position in range(opening, unclosed_from):
            char = text[position]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if not depth:
                    return match.start(), position + 1, unclosed_from == len(text)
        unclosed_from = opening
    return None
