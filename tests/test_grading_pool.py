"""eval.grading_pool: answer groups under the pool's time limits, and a worker that dies mid-item. (The pool's
grading tests, on input that would hang math-verify, are in test_grader.py.)"""

import os
import signal
import threading
import time

from eval.grading_pool import _Failed, _run_in_pool, iter_answer_groups

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
