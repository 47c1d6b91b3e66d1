"""eval.grading_pool: grading and answer groups under the pool's time limits, on input that would hang
math-verify, and workers that get stuck or die mid-item. (What `grade` answers is tested in test_grader.py.)"""

import os
import random
import signal
import string
import subprocess
import sys
import threading
import time

import pytest

from eval.answers import grade
from eval.grading_pool import _Failed, _run_in_pool, grade_many, iter_answer_groups

SLOW = "+".join(["x^{2}"] * 150)  # passes too_costly; ~1-2 s of pure Python parsing (SIGALRM stops it)
STUCK = "10^{10^{8}+1}"  # not a plain tower, so not pre-checked: a huge integer power in C (the worker is killed)


def test_answer_groups_merge_equivalent_answers():
    problems = [["\\frac{1}{2}", "1/2", "0.5", "", "2"], ["3", "x", "3.0"], []]
    assert dict(iter_answer_groups(problems, workers=2, timeout_s=30)) == {0: [0, 0, 0, -1, 1], 1: [0, 1, 0], 2: []}


def test_a_problem_whose_grouping_runs_out_of_time_gets_none_and_the_others_go_on():
    problems = [["1", SLOW], ["\\frac{1}{2}", "0.5"], ["2", STUCK], ["4", "2^{2}", "5"]]
    started = time.monotonic()
    groups = dict(iter_answer_groups(problems, workers=1, timeout_s=0.25))
    elapsed = time.monotonic() - started
    assert groups == {0: None, 1: [0, 0], 2: None, 3: [0, 0, 1]}
    # one worker: a 0.25 s timeout, one kill after the grace period, a replacement, never a stall
    assert elapsed < 25, f"grouping took {elapsed:.0f} s"


def _work(task: str) -> int:
    """Run in a worker, by the pool's machinery: the task's length, after doing what it says. "die" kills the
    worker as the out-of-memory killer would; "die when idle" kills it 0.1 s after this item; "slow" takes 0.1 s
    (so its result is sent before the next item starts); "stuck" holds the worker 30 s where the pool's timer does
    not reach, as C code would."""
    if task == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if task == "die when idle":
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGKILL)).start()
    if task == "slow":
        time.sleep(0.1)
    if task == "stuck":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(30)
    return len(task)


def run_tasks(tasks, timeout_s, pause_after_first_s=0.0):
    """{index: result} of _work on each task in one worker; the caller takes `pause_after_first_s` over the first."""
    results = {}
    for index, result in _run_in_pool(_work, lambda i: (tasks[i],), range(len(tasks)), workers=1,
                                      timeout_s=timeout_s):
        results[index] = result
        time.sleep(pause_after_first_s if len(results) == 1 else 0)
    return results


def test_a_worker_that_dies_mid_item_fails_that_item_naming_the_cause_and_the_others_go_on():
    # the item runs well within its time limit: a dead worker is not a timeout
    results = run_tasks(["a", "bb", "die", "dddd", "eeeee"], timeout_s=60)
    assert {i: r for i, r in results.items() if i != 2} == {0: 1, 1: 2, 3: 4, 4: 5}
    assert isinstance(results[2], _Failed)
    assert "killed by signal 9" in results[2].error and "out of memory" in results[2].error


def test_a_worker_that_dies_between_batches_is_replaced_and_no_item_is_blamed():
    # the pool sends the second item only once the first is answered and the (slow) caller asks for more
    results = run_tasks(["die when idle", "b"], timeout_s=60, pause_after_first_s=1.0)
    assert results == {0: len("die when idle"), 1: 1}


def test_a_long_item_never_waits_in_the_pipe_behind_a_stuck_one():
    # the long items cannot be queued behind "stuck" (they would block the pool's send until it is done): they go
    # to the replacement worker once the stuck one is killed
    long = ["x" * 300_000, "y" * 300_000]
    started = time.monotonic()
    results = run_tasks(["slow", "stuck", *long], timeout_s=0.5)
    elapsed = time.monotonic() - started
    assert results == {0: 4, 1: _Failed(), 2: 300_000, 3: 300_000}
    assert elapsed < 20, f"took {elapsed:.0f} s: the pool waited for the stuck item"


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
