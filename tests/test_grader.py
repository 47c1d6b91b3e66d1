"""eval.answers on known cases, the cost checks that keep math-verify bounded, and every MATH-500 gold against its
own reference solution. (The worker pool is tested in test_grading_pool.py, eval.metrics in test_metrics.py.)"""

import time

import pytest

from eval.answers import MAX_NESTING, grade, last_boxed, too_costly
from eval.benchmarks import load_benchmark
from eval.grading_pool import grade_many


@pytest.mark.parametrize("completion, gold, label, extracted", [
    ("So the total is \\boxed{204}.", "204", "correct", "204"),
    ("So the total is \\boxed{205}.", "204", "incorrect", "205"),
    ("\\boxed{-14}", "-14", "correct", "-14"),
    # no box: the last number, or LaTeX math written after it
    ("The answer is 42.", "42", "correct", "42"),
    ("30 - 16 = -14? No: 30-16 = 14", "14", "correct", "14"),
    ("So the final answer is 30 - 16 = 15.", "14", "incorrect", "15"),
    ("The answer is 30 - 16.", "14", "incorrect", "16"),  # restating the question does not score
    ("It is -3/4", "-\\frac{3}{4}", "correct", "-3/4"),
    ("$16 \\times 10 = 160$ and $16 \\times 9 = 144$, total 304", "304", "correct", "304"),
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}", "correct", "\\frac{1}{2}"),
    ("I have no idea.", "42", "no_answer", ""),
    ("\\boxed{2125}", "2,125", "correct", "2125"),  # GSM8K golds keep thousands separators
    # LaTeX fractions, in gold and prediction, equal by value
    ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", "correct", "\\frac{14}{3}"),
    ("\\boxed{\\frac{1}{2}}", "0.5", "correct", "\\frac{1}{2}"),
    ("\\boxed{\\frac{2}{3}}", "\\frac{1}{2}", "incorrect", "\\frac{2}{3}"),
    # the last box wins, not a set of all boxes
    ("first \\boxed{1}, then corrected: \\boxed{2}", "2", "correct", "2"),
    ("first \\boxed{2}, then corrected: \\boxed{1}", "2", "incorrect", "1"),
    # only the text after the last </think> is read
    ("<think>maybe \\boxed{3}</think>Final: \\boxed{4}", "4", "correct", "4"),
    ("<think>maybe \\boxed{4}</think>Final: \\boxed{3}", "4", "incorrect", "3"),
    # thinking never closed: a number in the reasoning is not an answer, a box still is
    ("<think>2 + 2 is 4", "4", "no_answer", ""),
    ("<think>so \\boxed{4}", "4", "correct", "4"),
])
def test_grade_known_cases(completion, gold, label, extracted):
    result = grade(completion, gold)
    assert (result.label, result.extracted) == (label, extracted)
    assert result.correct == (label == "correct")


def test_math500_gold_needs_dollar_wrapping():
    from math_verify import LatexExtractionConfig, parse

    gold = "\\left( 3, \\frac{\\pi}{2} \\right)"  # MATH-500 test/precalculus/807.json
    assert parse(gold, [LatexExtractionConfig()]) == []  # the trap: raw, it does not parse at all
    assert grade("In polar form: \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", gold).label == "correct"
    assert grade("\\boxed{(3, \\pi)}", gold).label == "incorrect"


def test_truncated_only_counts_a_box():
    assert grade("Let me compute 6*7 = 42 and then", "42", finish_reason="length").label == "truncated"
    # stopped mid-sentence with no answer statement: 42 is the computation under way, not an answer (issue 27)
    assert grade("Let me compute 6*7 = 42 and then", "42", finish_reason="stop").label == "no_answer"
    assert grade("So the answer is 42, and then", "42", finish_reason="stop").label == "correct"
    assert grade("\\boxed{42} and now let me check", "42", finish_reason="length").label == "correct"
    assert grade("\\boxed{41} and now let me check", "42", finish_reason="length").label == "incorrect"


@pytest.mark.parametrize("gold", ["", "???", None])
def test_bad_gold_is_reported_not_wrong(gold):
    assert grade("\\boxed{1}", gold).label == "bad_gold"


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\boxed{\\frac{1}{2}}"
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{3") == "\\boxed{1}"  # cut-off box: the previous one
    assert last_boxed("no box") is None


@pytest.mark.parametrize("answer", [
    "10^{10^{10^{10}}}", "9^{9^{9}}", "2^{3^{4^{5}}}", "10^{10^{10}}", "10^{10000000}", "{10}^{10^{7}}",
    "(10)^{10^{10}}", "x^{10^{10^{10}}}", "1 + 10^{ {10}^{10} }", "9" * 1001, "{" * (MAX_NESTING + 1) + "1" + "}" * 11,
])
def test_too_costly_catches_what_sympy_cannot_finish(answer):
    assert too_costly(answer)
    started = time.monotonic()
    assert grade(f"So \\boxed{{{answer}}}.", "5").label == "timeout"  # in-process, no pool: the check alone
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("answer, gold", [
    ("2^{10}", "1024"), ("10^{3}", "1000"), ("2^{2^{2^{2}}}", "65536"), ("x^{2^{3}}", "x^8"), ("10^{100}", "10^{100}"),
    ("x^{10^{10}}", "x^{10^{10}}"), ("\\frac{1}{1+\\frac{1}{1+\\frac{1}{2}}}", "\\frac{3}{5}"),
    ("\\left(3, \\frac{\\pi}{2}\\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
])
def test_small_powers_and_nesting_are_graded_as_usual(answer, gold):
    assert not too_costly(answer)
    assert grade(f"\\boxed{{{answer}}}", gold).label == "correct"


def test_no_math500_reference_answer_is_too_costly():
    _, rows = load_benchmark("math500")
    for row in rows:
        assert not too_costly(last_boxed(row["solution"])[len("\\boxed{"):-1]), row["id"]


def test_every_math500_gold_verifies_against_its_reference_solution():
    # the boxed answer inside each `solution` must grade correct against the `answer` column: 500/500
    benchmark, rows = load_benchmark("math500")
    assert len(rows) == 500
    graded = grade_many([r["solution"] for r in rows], [r["answer"] for r in rows], workers=2, timeout_s=30,
                        gold_is_latex=benchmark.gold_is_latex)
    failed = [(r["id"], r["answer"], g.label, g.extracted) for r, g in zip(rows, graded) if not g.correct]
    assert failed == []
