"""eval.answers.grade on the answer shapes plain math-verify misreads (ordinals and units, punctuation inside the
math, prose final statements, replies that stop mid-derivation), on long traces, and on the labelled dev set that
scripts/grader_devset.py generates."""

import importlib.util
import sys
from pathlib import Path

import pytest

from eval.answers import grade

REPO = Path(__file__).resolve().parent.parent
REASONING = ("Let me set this up. We have 3 groups of 7, so 3 * 7 = 21, and $x^2 + 1 = 5$ gives $x = 2$.\n"
             "Wait, let me double check: 21 / 3 = 7. Yes.\n\n")


@pytest.mark.parametrize("answer, gold, label", [
    # ordinals and units around the answer
    ("\\boxed{12^{\\mathrm{th}} \\text{ grade}}", "12", "correct"),
    ("\\boxed{11^{\\mathrm{th}} \\text{ grade}}", "12", "incorrect"),
    ("\\boxed{12^{th}}", "12", "correct"),
    ("\\boxed{12^{\\text{th}}}", "12", "correct"),
    ("\\boxed{12\\text{th}}", "12", "correct"),
    ("\\boxed{2^{\\rm nd}}", "2", "correct"),
    ("So she is in the 12th grade.", "12", "correct"),
    ("So she is in the 11th grade.", "12", "incorrect"),
    ("The area is $864 \\text{ square inches}$.", "864 \\mbox{ inches}^2", "correct"),
    ("The area is $846 \\text{ square inches}$.", "864 \\mbox{ inches}^2", "incorrect"),
    ("\\boxed{x^{2}}", "x^2", "correct"),  # a power is not an ordinal
    # a period or comma that ends the sentence inside the math
    ("The final answer is $(2, -1, 2).$", "(2, -1, 2)", "correct"),
    ("The final answer is $(2, 1, -2).$", "(2, -1, 2)", "incorrect"),
    ("We conclude that the answer is $x \\in [2, 5),$ as claimed.", "[2, 5)", "correct"),
    ("We conclude that the answer is $x \\in (2, 5],$ as claimed.", "[2, 5)", "incorrect"),
    ("So the answer is \\boxed{\\frac{7}{4}.}", "\\frac{7}{4}", "correct"),
    # prose final statements with no box
    ("So, the final answer is \\( (a + 5)(b + 2) \\).", "(a+5)(b+2)", "correct"),
    ("So, the final answer is \\( (a + 2)(b + 5) \\).", "(a+5)(b+2)", "incorrect"),
    ("Therefore, the minimum value of the given expression is 64.", "64", "correct"),
    ("Therefore, the minimum value of the given expression is 46.", "64", "incorrect"),
    ("the final answer is east", "\\text{east}", "correct"),
    ("the final answer is east", "east", "correct"),
    ("the final answer is west", "\\text{east}", "incorrect"),
    ("the final answer is seat", "east", "incorrect"),  # a word gold is text, not the product e*a*s*t
    ("Therefore, the value of \\( b \\) is indeed \\( \\frac{7}{4} \\).", "\\frac{7}{4}", "correct"),
    ("Therefore, the value of \\( b \\) is indeed \\( \\frac{4}{7} \\).", "\\frac{7}{4}", "incorrect"),
    ("Therefore, the person who finishes first is Evelyn.", "\\text{Evelyn}", "correct"),
    ("**Answer:** (C)", "\\text{(C)}", "correct"),
    ("The answer is (2, -1, 2).", "(2, -1, 2)", "correct"),  # a tuple of plain numbers, not its last number
    ("The solutions are $x = 2$ and $x = 3$.", "2, 3", "correct"),
    ("Final Answer: The final answer is $42$. I hope it is correct.", "42", "correct"),
    # the answer statement counts, not the numbers of a check written after it
    ("Therefore, the answer is 5.\n\nLet me verify: 2 \\cdot 5 + 3 = 13, which matches.", "5", "correct"),
    ("Therefore, the answer is 6.\n\nLet me verify: 2 \\cdot 5 + 3 = 13, which matches.", "5", "incorrect"),
    # a statement's answer is the expression its first math starts, not the sentence's last number (SmolLM2 wrote
    # these in the quickstart)
    ("3. Determine the final answer: 126 is the result of the multiplication of 21 and 6.", "126", "correct"),
    ("3. Determine the final answer: 127 is the result of the multiplication of 21 and 6.", "126", "incorrect"),
    ("So the final answer is 30 - 16 = 14.", "14", "correct"),
    ("The remainder is 2, so the answer is 2.\n\nSo, 2 * 11 = 22.\n\nSo, the solution is 22.", "22", "correct"),
    # the prompt's instruction, echoed, states no answer
    ("To put your final answer within \\boxed{}, multiply 16 and 7:\n\n16 * 7 = 112", "112", "correct"),
    ("To put your final answer within \\boxed{}, multiply 16 and 7:\n\n16 * 7 = 113", "112", "incorrect"),
    # restating the question is not answering it
    ("So the answer is 30 - 16.", "14", "incorrect"),
    ("So the question asks: what is $30 - 16$?", "14", "no_answer"),
])
def test_answer_shapes(answer, gold, label):
    for completion in (answer, REASONING + answer, f"<think>\n{REASONING}</think>\n\n{answer}"):
        assert grade(completion, gold).label == label, completion


@pytest.mark.parametrize("completion", [
    "So x = 5. Now let's find y. We know y = 3x - 1, so y = 3 \\cdot 5 - ",  # on an operator
    "We have $a = 5$. Substituting gives $b = 2a + 1 = 11$. Then $c = b - a = ",  # inside an opened $
    "So the value is 5.\nNow we need to check whether this also satisfies the second condition, which says that the",
    "First I think the answer is 5. Let me make sure by checking the other equation, which gives",
    "x = 5\ny = 2x = 10\nz = x + y = 15\nw = z - ",
    "So the answer is \\boxed{5",  # inside a box
])
def test_a_reply_that_stops_mid_derivation_after_the_gold_has_no_answer(completion):
    for text in (completion, REASONING + completion, f"<think>\n{REASONING}</think>\n\n{completion}"):
        assert grade(text, "5").label == "no_answer", text
        assert grade(text, "5", finish_reason="length").label == "truncated", text


@pytest.mark.parametrize("completion, finish_reason, label", [
    (f"<think>\n{REASONING}So the answer should be 5.", "stop", "no_answer"),
    (f"<think>\n{REASONING}So the answer is \\boxed{{5}}. Let me double-check the", "length", "correct"),
    (f"{REASONING}So far this gives 5, and now I need to add the remaining", "length", "truncated"),
    (f"{REASONING}A first attempt gives \\boxed{{5}}. Wait, let me re-check the second case, where", "length",
     "correct"),
    (f"{REASONING}A first attempt gives \\boxed{{4}}. Wait, let me re-check the second case, where", "length",
     "incorrect"),
])
def test_unfinished_and_truncated_replies_only_count_a_box(completion, finish_reason, label):
    assert grade(completion, "5", finish_reason=finish_reason).label == label


@pytest.mark.parametrize("ending, label", [
    ("\n</think>\n\nTherefore, the answer is $\\boxed{42}$.", "correct"),
    ("\n</think>\n\nSo, the final answer is \\( 42 \\).", "correct"),
    ("\n</think>\n\nSo, the final answer is \\( 41 \\).", "incorrect"),
    # <think> never closed: only a box counts, and not the guess \boxed{17}: the trace computed on after it
    ("So far this gives 42, and now I need to", "no_answer"),
])
def test_a_long_trace_reaches_math_verify_only_as_its_answer(monkeypatch, ending, label):
    import math_verify

    seen = []
    parse = math_verify.parse

    def recording_parse(text, *args, **kwargs):
        seen.append(len(text))
        return parse(text, *args, **kwargs)

    monkeypatch.setattr(math_verify, "parse", recording_parse)
    filler = ("Wait, let me double check: $3x + 2 = 11$ gives $x = 3$, and \\boxed{17} was a guess. "
              "Then 12 * 7 = 84 and 84 - 3 = 81.\n")
    trace = "<think>\n" + filler * (100_000 // len(filler) + 1) + ending
    assert len(trace) > 100_000
    assert grade(trace, "42").label == label
    assert max(seen, default=0) < 100, seen  # the gold and the answer, never the trace


def _grader_devset():
    spec = importlib.util.spec_from_file_location("grader_devset", REPO / "scripts" / "grader_devset.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_the_dev_set_file_is_what_the_script_generates():
    devset = _grader_devset()
    rows = devset.devset_rows()
    assert (REPO / "data" / "grader_devset.jsonl").read_text() == devset.devset_jsonl(rows)
    assert len(rows) >= 300 and len({row["id"] for row in rows}) == len(rows)
    assert {row["expected"] for row in rows} == {"correct", "incorrect", "no_answer", "truncated"}
    assert all(row["rationale"] for row in rows)


def test_ours_agrees_with_the_dev_set_labels_better_than_plain_math_verify():
    # BENCHMARKS.md "Grader dev set": ours 0.979 (0.963 on all four labels), plain math-verify 0.672, 0.795 with
    # the gold wrapped in $...$
    devset = _grader_devset()
    rows = devset.devset_rows()
    shares = devset.agreement(rows, devset.score(rows))
    assert shares["ours"] >= 0.97 and shares["ours_labels"] >= 0.95
    assert shares["ours"] >= max(shares["plain"], shares["plain_wrapped"]) + 0.1


@pytest.mark.parametrize("answer, gold, label", [
    # issue 27's kinds, right and wrong. Operands named after the answer: the answer, not the last operand
    ("So 42 is the sum of 17 and 25.", "42", "correct"),
    ("So 43 is the sum of 17 and 25.", "42", "incorrect"),
    ("The total number of apples is 42, which is the sum of 17 and 25.", "42", "correct"),
    ("Thus the total is $42$, the product of $6$ and $7$.", "42", "correct"),
    ("Thus the total is $41$, the product of $6$ and $7$.", "42", "incorrect"),
    ("The answer is the sum of 17 and 25, which is 42.", "42", "correct"),
    ("The answer is the sum of 17 and 24, which is 41.", "42", "incorrect"),
    # a numeral in a base: digits and base, not the base alone nor math-verify's value
    ("So the answer is 1021_3.", "1021_3", "correct"),
    ("So the answer is 1012_3.", "1021_3", "incorrect"),
    ("Therefore we get 1021_3", "1021_3", "correct"),
    ("\\boxed{1021_{3}}", "1021_3", "correct"),
    ("\\boxed{\\text{1021}_3}", "1021_{3}", "correct"),
    ("\\boxed{1021}", "1021_3", "correct"),  # no subscript: read in the base the problem asked for
    ("\\boxed{1021_4}", "1021_3", "incorrect"),
    ("\\boxed{34_{10}}", "1021_3", "incorrect"),  # the same value in base 10 is not the base-3 answer
    ("\\boxed{3}", "1021_3", "incorrect"),
    # a sign-off after the answer, with or without its period
    ("So, the answer is 42. I think that's right", "42", "correct"),
    ("So, the answer is 41. I think that's right.", "42", "incorrect"),
    ("So the result is $42$.\nLet me know if you have any other questions", "42", "correct"),
    ("The answer is 42.\nGood luck with the rest of your homework", "42", "correct"),
    # the last display equation: its right-hand side
    ("The final result is:\n\\[ \\cos B = \\frac{3}{5} \\]", "\\frac{3}{5}", "correct"),
    ("The final result is:\n\\[ \\cos B = \\frac{4}{5} \\]", "\\frac{3}{5}", "incorrect"),
    ("$$\\cos B = 3/5$$", "\\frac{3}{5}", "correct"),
    # a gold equation in a normal form (integer coefficients, gcd 1): that equation, not a multiple
    ("\\boxed{2x - 3y + z - 5 = 0}", "2x - 3y + z - 5 = 0", "correct"),
    ("\\boxed{2x - 3y + z = 5}", "2x - 3y + z - 5 = 0", "correct"),
    ("\\boxed{-4x + 6y - 2z + 10 = 0}", "2x - 3y + z - 5 = 0", "incorrect"),
    ("\\boxed{-2x + 3y - z + 5 = 0}", "2x - 3y + z - 5 = 0", "incorrect"),
    ("\\boxed{2y = 4x + 6}", "y = 2x + 3", "correct"),  # not `P = 0`: math-verify's equivalence
    ("\\boxed{1021_3 = 34_{10}}", "1021_3", "correct"),  # a side of an equation that is the gold numeral
    # an expression still being written, or the task restated, is no result; a range is no expression
    ("Now we add the remaining part: 34 + 8", "8", "no_answer"),
    ("Now 3 * 14 = 42, and 42 + 7 = 49, so", "49", "no_answer"),
    ("Therefore the pages read are 5-10.", "10", "correct"),
    # a sign-off is a few words that end the reply; work after it is unfinished
    ("The answer is 5.\nI think that's right, but let me double check the", "5", "no_answer"),
    ("The answer is 5. I think that's right. Hmm, but wait, maybe the other case gives", "5", "no_answer"),
    ("So we need to compute $8 \\cdot 8$.", "64", "no_answer"),
])
def test_issue_27_shapes(answer, gold, label):
    for completion in (answer, REASONING + answer, f"<think>\n{REASONING}</think>\n\n{answer}"):
        assert grade(completion, gold).label == label, completion


@pytest.mark.parametrize("completion, finish_reason, label", [
    # cut inside the final box: not credited from the box before it
    (f"{REASONING}So x = \\boxed{{5}}, and the final answer is \\boxed{{\\frac{{5}}{{", "length", "truncated"),
    (f"{REASONING}So x = \\boxed{{5}}, and the final answer is \\boxed{{\\frac{{5}}{{", "stop", "no_answer"),
    # a cut trace's box that it computed on from was a step, not its answer
    (f"<think>\n{REASONING}So the intermediate value is \\boxed{{5}}. Let me re-check.\nThen 12 * 7 = 84 and 84 - ",
     "length", "truncated"),
    (f"{REASONING}So the intermediate value is \\boxed{{5}}. Then 12 * 7 = 84, so", "length", "truncated"),
    # ... but one stated as the answer counts, and so does one with no computation after it
    (f"{REASONING}So the answer is \\boxed{{5}}. Let me verify: 5 * 3 = 15, and", "length", "correct"),
    (f"<think>\n{REASONING}So the answer should be \\boxed{{5}}. Let me verify: 6 * 7 = 42 and", "length", "correct"),
    (f"<think>\n{REASONING}So \\boxed{{5}} is the answer. Let me double check: 6 * 7 = 42, and", "length", "correct"),
    (f"<think>\n{REASONING}Therefore, \\boxed{{5}}.\n\nWait, let me double-check step 2 of the", "length", "correct"),
    (f"{REASONING}So the answer is \\boxed{{4}}. Let me verify: 4 * 3 = 12, and", "length", "incorrect"),
    (f"{REASONING}A first attempt gives \\boxed{{5}}. Wait, let me re-check the second case, where", "length",
     "correct"),
])
def test_a_trace_cut_mid_computation_is_not_credited_from_an_intermediate_box(completion, finish_reason, label):
    assert grade(completion, "5", finish_reason=finish_reason).label == label
