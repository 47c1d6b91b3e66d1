"""The grading pool: a function of eval.answers on many items in worker processes, each item under a time limit.
`iter_grades` / `grade_many` run `grade` on (completion, gold) pairs (the verify and evaluate steps);
`iter_answer_groups` runs `answer_groups` on each problem's extracted answers (maj@k).

math-verify's own timeouts use `signal.alarm`, which works only on a process's main thread; here they are turned
off and the pool enforces the limit itself, in three layers:
- `too_costly` (eval.answers) labels answers math-verify cannot grade in bounded time `timeout` before parsing.
- Each item runs in a worker process (its main thread) under a SIGALRM timer of `timeout_s`, which stops pure
  Python work (the LaTeX parser, most of sympy) and marks the item timed out; the worker goes on to the next.
- Work stuck in C (a big-integer operation) does not see the signal: the parent kills that worker
  KILL_GRACE_S later and forks a new one from the warm grading server (eval.grading_server), ready in milliseconds.
An item whose function raises, or whose worker dies on its own (the out-of-memory killer, a crash in C), failed:
a grade labelled `error` with the cause in `Grade.error`, or no answer groups. The other items go on.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait

from eval.answers import TIMEOUT, Grade, OverTime, answer_groups, grade

_WORKER_START_TIMEOUT_S = 120.0
KILL_GRACE_S = 2.0  # past its timeout, how long a worker may take to notice SIGALRM before it is killed
MAX_BATCH = 128  # items per message to a worker
# a batch queued for a busy worker waits unread in the pipe, which holds ~100-200 KB on Linux: past that our send
# would block until the worker is done with its current batch -- for ever, behind an item stuck in C
QUEUE_AHEAD_BYTES = 64 * 1024
SEND_EVERY_S = 0.02  # a worker sends its results this often (and at the end of each batch), not once per item


def grade_many(completions: Sequence[str | None], golds: Sequence[str | None], *, workers: int, timeout_s: float,
               finish_reasons: Sequence[str | None] | None = None,
               gold_is_latex: bool | None = None) -> list[Grade]:
    """Grade completions[i] against golds[i] in `workers` processes; an item over `timeout_s` is `timeout`."""
    grades: list[Grade | None] = [None] * len(completions)
    for index, result in iter_grades(completions, golds, workers=workers, timeout_s=timeout_s,
                                     finish_reasons=finish_reasons, gold_is_latex=gold_is_latex):
        grades[index] = result
    return grades  # type: ignore[return-value]


def iter_grades(completions: Sequence[str | None], golds: Sequence[str | None], *, workers: int, timeout_s: float,
                finish_reasons: Sequence[str | None] | None = None, gold_is_latex: bool | None = None,
                skip: set[int] | frozenset[int] = frozenset()) -> Iterator[tuple[int, Grade]]:
    """Yield (index, Grade) as items finish, in no fixed order; indices in `skip` are not graded.

    Items go to workers grouped by gold, so that a worker's batch of consecutive items shares few golds and the
    worker parses each once (its cache) instead of every worker parsing every gold.
    """
    if len(golds) != len(completions) or (finish_reasons is not None and len(finish_reasons) != len(completions)):
        raise ValueError("completions, golds and finish_reasons must have the same length")
    todo = [i for i in range(len(completions)) if i not in skip]
    gold_order: dict = {}
    for i in todo:
        gold_order.setdefault(golds[i], len(gold_order))
    todo.sort(key=lambda i: gold_order[golds[i]])  # stable: each gold's items keep their order

    def arguments(i: int) -> tuple:
        return completions[i], golds[i], finish_reasons[i] if finish_reasons is not None else None, gold_is_latex

    for index, result in _run_in_pool(_grade_item, arguments, todo, workers=workers, timeout_s=timeout_s):
        if isinstance(result, _Failed):
            result = Grade("error", False, "", error=result.error) if result.error else TIMEOUT
        yield index, result


def iter_answer_groups(problems: Sequence[Sequence[str]], *, workers: int,
                       timeout_s: float) -> Iterator[tuple[int, list[int] | None]]:
    """Yield (index, eval.answers.answer_groups(problems[index])) as problems finish, in no fixed order; the groups
    are None for a problem whose grouping took longer than `timeout_s` or failed (group by exact text instead)."""
    for index, groups in _run_in_pool(answer_groups, lambda i: (list(problems[i]),), range(len(problems)),
                                      workers=workers, timeout_s=timeout_s):
        yield index, None if isinstance(groups, _Failed) else groups


def _grade_item(completion: str | None, gold: str | None, finish_reason: str | None,
                gold_is_latex: bool | None) -> Grade:
    # positional, as the pool passes an item's arguments
    return grade(completion, gold, gold_is_latex=gold_is_latex, finish_reason=finish_reason)


@dataclass(frozen=True)
class _Failed:
    """What an item yields instead of its function's result: it ran out of time (`error` "") or failed (`error`
    holds the exception, or how its worker died)."""
    error: str = ""


def _run_in_pool(function: Callable, arguments: Callable[[int], tuple], indices: Iterable[int], *, workers: int,
                 timeout_s: float) -> Iterator[tuple[int, object]]:
    """Yield (index, function(*arguments(index)) or _Failed) for each index, as items finish.

    `function` must be importable by name (it is sent to the workers as a reference). Items go to workers in
    `indices` order, in batches. A worker's next batch is queued before it finishes the current one, so it never
    waits for the parent (if the batch fits in the pipe: QUEUE_AHEAD_BYTES), and it sends results every
    SEND_EVERY_S rather than once per item, so the parent takes little of the workers' CPU. Batches shrink
    towards the end: no worker is left with a long tail.
    """
    if workers < 1 or timeout_s <= 0:
        raise ValueError(f"need workers >= 1 and timeout_s > 0, got {workers} and {timeout_s}")
    pending = deque(indices)
    if not pending:
        return
    context = _pool_context()
    # workers start side by side and take items once ready; a replacement starts while the others keep working
    pool = [_Worker(context) for _ in range(min(workers, len(pending)))]
    try:
        while pending or any(w.batches for w in pool):
            for k, worker in enumerate(pool):
                if not (worker.ready and pending and len(worker.batches) < 2):
                    continue
                size = max(1, min(MAX_BATCH, len(pending) // (2 * len(pool))))
                items = _take(pending, size, arguments, max_bytes=QUEUE_AHEAD_BYTES if worker.batches else None)
                try:
                    worker.submit(function, items, timeout_s)
                except (BrokenPipeError, ConnectionResetError):  # it has died: its items are seen to below
                    pending.extendleft(reversed([i for i, _ in items]))
                    if not worker.batches:  # it died idle, on no item of ours
                        worker.kill()
                        pool[k] = _Worker(context)
            waiting = [w for w in pool if not w.ready or w.batches]
            next_deadline = min(w.deadline for w in waiting)
            ready = wait([w.conn for w in waiting], timeout=max(0.0, next_deadline - time.monotonic()))
            for k, worker in enumerate(pool):
                if worker not in waiting:
                    continue
                died = False
                if worker.conn in ready:
                    try:
                        results = worker.receive()
                    except EOFError:  # it exited on its own: nothing of ours kills a worker we still read from
                        died = True
                    else:
                        yield from results
                        continue
                elif time.monotonic() < worker.deadline:
                    continue
                outstanding = [i for batch in worker.batches for i in batch]
                if not outstanding:
                    raise RuntimeError(f"a grading worker exited during start-up or did not start within "
                                       f"{_WORKER_START_TIMEOUT_S:.0f} s")
                worker.kill()  # dead, or stuck where SIGALRM does not reach (C code)
                pool[k] = _Worker(context)
                culprit = worker.current.value
                if culprit not in outstanding:  # it ended between items: blame the next, so no item can loop forever
                    culprit = outstanding[0]
                # the rest, done before it but not yet sent or not yet started, go to the next free worker
                pending.extendleft(reversed([i for i in outstanding if i != culprit]))
                yield culprit, _Failed(worker.cause_of_death() if died else "")
    finally:
        for worker in pool:
            worker.kill()


def _take(pending: deque[int], size: int, arguments: Callable[[int], tuple],
          max_bytes: int | None) -> list[tuple[int, tuple]]:
    """The next batch: (index, arguments) of up to `size` items off the front of `pending`, as many as fit in
    `max_bytes` pickled (maybe none) if it is set."""
    items: list[tuple[int, tuple]] = []
    total_bytes = 0
    while pending and len(items) < size:
        item = (pending[0], arguments(pending[0]))
        if max_bytes is not None:
            total_bytes += len(pickle.dumps(item))
            if total_bytes > max_bytes:
                break
        items.append(item)
        pending.popleft()
    return items


def _pool_context():
    # Workers (and replacements for killed ones) fork from a server process that imported math-verify and warmed
    # it up once (eval.grading_server), so one starts warm in milliseconds instead of each paying ~1 s; the server
    # is a fresh process, safe where a plain fork of this one (torch/vLLM threads) is not. If other code started
    # the server first, without this preload, each worker imports and warms up on its own.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "eval.grading_server"])
    return context


class _Worker:
    """One worker process with a pipe; it holds up to two batches (one being worked on, one queued) and answers
    in order, several items a message; `current` (shared memory) holds the index of the item it is on."""

    def __init__(self, context):
        self.conn, child_conn = context.Pipe()
        self.current = context.RawValue("q", -1)
        self.process = context.Process(target=_worker_loop, args=(child_conn, self.current), daemon=True)
        self.process.start()
        child_conn.close()
        self.ready = False  # until it says so: the first item must not pay for start-up (imports, sympy warm-up)
        self.batches: deque[deque[int]] = deque()  # indices sent and not yet answered, in the order it works on them
        self.deadline = time.monotonic() + _WORKER_START_TIMEOUT_S
        self.timeout_s = 0.0

    def submit(self, function: Callable, items: list[tuple[int, tuple]], timeout_s: float) -> None:
        if not items:
            return
        self.conn.send((function, items, timeout_s))
        if not self.batches:  # otherwise the clock of the item it is on runs on
            self.deadline = time.monotonic() + timeout_s + KILL_GRACE_S + SEND_EVERY_S
        self.batches.append(deque(i for i, _ in items))
        self.timeout_s = timeout_s

    def receive(self) -> list[tuple[int, object]]:
        """(index, result) of the items done since its last message ([] for the start-up message)."""
        message = self.conn.recv()
        if message == "ready":
            self.ready = True
            return []
        # no message for longer than one item may take (timeout, grace, the wait to send) means it is stuck
        self.deadline = time.monotonic() + self.timeout_s + KILL_GRACE_S + SEND_EVERY_S
        done = []
        for result in message:
            done.append((self.batches[0].popleft(), result))
            if not self.batches[0]:
                self.batches.popleft()
        return done

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def cause_of_death(self) -> str:
        """How a worker that exited on its own ended (once it is joined), for the item it was on."""
        code = self.process.exitcode
        if code is None or code >= 0:
            return f"the grading worker exited with code {code} on this item"
        cause = f"the grading worker was killed by signal {-code} ({signal.strsignal(-code)}) on this item"
        return cause + (": out of memory, most likely" if -code == signal.SIGKILL else "")


def _worker_loop(conn, current) -> None:
    # timeouts are enforced here and by the parent, so math-verify's "timeout is disabled" warning is noise
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    signal.signal(signal.SIGALRM, _over_time)
    grade("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}")  # warm up sympy and the LaTeX parser
    conn.send("ready")
    while True:
        try:
            function, items, timeout_s = conn.recv()
        except EOFError:
            return
        results: list = []
        sent_at = time.monotonic()
        for n, (index, arguments) in enumerate(items):
            current.value = index  # a memory write, no system call: the parent reads it if it has to kill us
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                try:
                    result = function(*arguments)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except OverTime:  # the timer, in a function that does not catch it (grade does) or just after it
                result = _Failed()
            except Exception as error:  # this item failed; the rest of the batch goes on
                result = _Failed(f"{type(error).__name__}: {error}"[:500])
            results.append(result)
            if n == len(items) - 1 or time.monotonic() - sent_at >= SEND_EVERY_S:
                conn.send(results)
                results, sent_at = [], time.monotonic()


def _over_time(signum, frame) -> None:
    raise OverTime
