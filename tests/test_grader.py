"""eval.answers on known cases, grade_many's worker pool on input that would hang math-verify, and every MATH-500
gold against its own reference solution. (eval.metrics is tested in test_metrics.py.)"""

import random
import string
import subprocess
import sys
import time

import pytest

from eval.benchmarks import load_benchmark
from eval.answers import MAX_NESTING, grade, last_boxed, too_costly
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
    assert grade("Let me compute 6*7 = 42 and then", "42", finish_reason="stop").label == "correct"
    assert grade("\\boxed{42} and now let me check", "42", finish_reason="length").label == "correct"
    assert grade("\\boxed{41} and now let me check", "42", finish_reason="length").label == "incorrect"


@pytest.mark.parametrize("gold", ["", "???", None])
def test_bad_gold_is_reported_not_wrong(gold):
    assert grade("\\boxed{1}", gold).label == "bad_gold"


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\boxed{\\frac{1}{2}}"
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{3") == "\\boxed{1}"  # cut-off box: the previous one
    assert last_boxed("no box") is None


def test_grade_many_matches_grade_and_keeps_order():
    completions = ["\\boxed{%d}" % (i if i % 3 else i + 1) for i in range(30)] + ["6*7 = 42 and", None]
    golds = [str(i) for i in range(30)] + ["42", "1"]
    reasons = ["stop"] * 30 + ["length", "stop"]
    graded = grade_many(completions, golds, workers=2, timeout_s=30, finish_reasons=reasons)
    assert graded == [grade(c, g, finish_reason=r) for c, g, r in zip(completions, golds, reasons)]
    assert [g.correct for g in graded[:30]] == [i % 3 != 0 for i in range(30)]
    assert [g.label for g in graded[30:]] == ["truncated", "no_answer"]


def test_pathological_input_ends_in_bounded_time():
    garbage = "".join(random.Random(0).choice(string.printable) for _ in range(50_000))
    completions = [
        "\\boxed{10^{10^{10^{10}}}}",  # sympy tries to evaluate the tower: never finishes
        garbage,
        "\\boxed{" + "9" * 50_000 + "}",
        "\\boxed{5}",  # a normal item after the stuck ones still gets graded, by a fresh worker
    ]
    started = time.monotonic()
    graded = grade_many(completions, ["5"] * 4, workers=2, timeout_s=3)
    elapsed = time.monotonic() - started
    assert graded[0].label == "timeout"
    assert all(g.label in ("timeout", "incorrect", "no_answer") for g in graded[1:3])
    assert graded[3].label == "correct"
    assert elapsed < 60, f"grading took {elapsed:.0f} s"


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


def test_slow_items_time_out_in_the_worker_and_a_stuck_worker_is_replaced_without_stalling():
    # pass the pre-check, ~0.8-2 s each of pure Python parsing (distinct, so no cache makes a repeat fast);
    # the timeout is well below that and far above the ~10 ms a plain answer takes
    slow = ["\\boxed{" + "+".join([f"{v}^{{2}}"] * 150) + "}" for v in "xyz"]
    stuck = "\\boxed{10^{10^{8}+1}}"  # not a plain tower, so not pre-checked: a huge integer power
    completions = slow + [stuck] + ["\\boxed{%d}" % i for i in range(20)]
    started = time.monotonic()
    graded = grade_many(completions, ["5"] * len(completions), workers=2, timeout_s=0.25)
    elapsed = time.monotonic() - started
    assert [g.label for g in graded[:4]] == ["timeout"] * 4
    assert [g.correct for g in graded[4:]] == [i == 5 for i in range(20)]
    # two workers: 4 timeouts of 0.25 s (+2 s grace if the signal is not seen) and start-up, never a stall
    assert elapsed < 25, f"grading took {elapsed:.0f} s"


def test_a_killed_worker_loses_none_of_the_items_queued_behind_the_stuck_one():
    # one worker holds its current batch and the next one queued; the item stuck in C sits between them
    stuck = "\\boxed{10^{10^{8}+1}}"
    completions = ["\\boxed{%d}" % (i % 7) for i in range(90)] + [stuck] + ["\\boxed{%d}" % (i % 7) for i in range(90)]
    graded = grade_many(completions, ["5"] * len(completions), workers=1, timeout_s=0.25)
    assert graded[90].label == "timeout"
    others = graded[:90] + graded[91:]
    assert [g.correct for g in others] == [i % 7 == 5 for i in range(90)] * 2
    assert {g.label for g in others} == {"correct", "incorrect"}


def test_the_grading_server_warms_up_on_answers_it_grades_correctly():
    from eval.grading_server import ANSWER_SHAPES  # importing it runs the warm-up

    # the shapes are graded against themselves at import: each must be a real answer, or the warm-up warms nothing
    for answer in ANSWER_SHAPES:
        assert grade(f"So the answer is \\boxed{{{answer}}}.", answer).label == "correct", answer
    # what a cold worker would import on its first items is loaded in the server before any worker forks
    code = "import sys, eval.grading_server; print('sympy.physics.units' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "True\n"


def test_an_error_inside_a_worker_is_an_error_row_and_the_others_are_graded():
    # a completion that is not text makes grade raise TypeError inside the worker, for that row only
    completions = ["\\boxed{1}", 123, "\\boxed{1}", "\\boxed{1}", "\\boxed{1}"]
    grades = grade_many(completions, ["1", "1", "1", "2", "1"], workers=2, timeout_s=5)
    assert [g.label for g in grades] == ["correct", "error", "correct", "incorrect", "correct"]
    assert grades[1].error.startswith("TypeError") and not grades[1].graded and grades[3].graded


def test_grade_many_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        grade_many(["\\boxed{1}"], ["1", "2"], workers=1, timeout_s=5)


def test_every_math500_gold_verifies_against_its_reference_solution():
    # the boxed answer inside each `solution` must grade correct against the `answer` column: 500/500
    benchmark, rows = load_benchmark("math500")
    assert len(rows) == 500
    graded = grade_many([r["solution"] for r in rows], [r["answer"] for r in rows], workers=2, timeout_s=30,
                        gold_is_latex=benchmark.gold_is_latex)
    failed = [(r["id"], r["answer"], g.label, g.extracted) for r, g in zip(rows, graded) if not g.correct]
    assert failed == []
