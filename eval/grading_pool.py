"""The grading pool: `grade` (eval.answers) on many (completion, gold) items in worker processes, each under a
time limit. Shared by the verify and evaluate steps.

math-verify's own timeouts use `signal.alarm`, which works only on a process's main thread; here they are turned
off and the pool enforces the limit itself, in three layers:
- `too_costly` (eval.answers) labels answers math-verify cannot grade in bounded time `timeout` before parsing.
- Each item runs in a worker process (its main thread) under a SIGALRM timer of `timeout_s`, which stops pure
  Python work (the LaTeX parser, most of sympy) and labels the item `timeout`; the worker goes on to the next.
- Work stuck in C (a big-integer operation) does not see the signal: the parent kills that worker
  KILL_GRACE_S later and forks a new one from the warm grading server (eval.grading_server), ready in milliseconds.
An item whose grading raises is labelled `error` with the exception in `Grade.error`; the others go on.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Iterator, Sequence
from multiprocessing.connection import wait

from eval.answers import TIMEOUT, Grade, OverTime, grade

_WORKER_START_TIMEOUT_S = 120.0
KILL_GRACE_S = 2.0  # past its timeout, how long a worker may take to notice SIGALRM before it is killed
MAX_BATCH = 128  # items per message to a worker
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

    Items go to workers in batches of consecutive items, grouped by gold: a worker parses each gold once (its
    cache) instead of every worker parsing every gold. A worker's next batch is queued before it finishes the
    current one, so it never waits for the parent, and it sends results every SEND_EVERY_S rather than once per
    item, so the parent takes little of the workers' CPU. Batches shrink towards the end: no worker is left with
    a long tail.
    """
    if len(golds) != len(completions) or (finish_reasons is not None and len(finish_reasons) != len(completions)):
        raise ValueError("completions, golds and finish_reasons must have the same length")
    if workers < 1 or timeout_s <= 0:
        raise ValueError(f"need workers >= 1 and timeout_s > 0, got {workers} and {timeout_s}")
    todo = [i for i in range(len(completions)) if i not in skip]
    if not todo:
        return
    gold_order: dict = {}
    for i in todo:
        gold_order.setdefault(golds[i], len(gold_order))
    pending = deque(sorted(todo, key=lambda i: gold_order[golds[i]]))  # stable: each gold's items keep their order

    def item(i: int) -> tuple:
        return i, (completions[i], golds[i], gold_is_latex, finish_reasons[i] if finish_reasons is not None else None)

    context = _pool_context()
    # workers start side by side and take items once ready; a replacement starts while the others keep grading
    pool = [_Worker(context) for _ in range(min(workers, len(pending)))]
    try:
        while pending or any(w.batch for w in pool):
            for worker in pool:
                # the next batch waits in the pipe before the current one is done: a worker never waits for us
                if worker.ready and len(worker.batch) <= MAX_BATCH // 2 and pending:
                    size = max(1, min(MAX_BATCH, len(pending) // (2 * len(pool))))
                    worker.submit([item(pending.popleft()) for _ in range(size)], timeout_s)
            waiting = [w for w in pool if not w.ready or w.batch]
            next_deadline = min(w.deadline for w in waiting)
            ready = wait([w.conn for w in waiting], timeout=max(0.0, next_deadline - time.monotonic()))
            for k, worker in enumerate(pool):
                if worker not in waiting:
                    continue
                if worker.conn in ready:
                    try:
                        yield from worker.receive()
                    except EOFError:  # the worker died (killed, out of memory): its item could not be graded
                        pass
                    else:
                        continue
                elif time.monotonic() < worker.deadline:
                    continue
                if not worker.batch:
                    raise RuntimeError(f"a grading worker exited during start-up or did not start within "
                                       f"{_WORKER_START_TIMEOUT_S:.0f} s")
                worker.kill()  # stuck where SIGALRM does not reach (C code): its current item is a timeout
                pool[k] = _Worker(context)
                stuck = worker.current.value
                if stuck not in worker.batch:  # it died between items: blame the next, so no item can loop forever
                    stuck = worker.batch[0]
                # the rest, graded before it but not yet sent or not yet started, go to the next free worker
                pending.extendleft(reversed([i for i in worker.batch if i != stuck]))
                yield stuck, TIMEOUT
    finally:
        for worker in pool:
            worker.kill()


def _pool_context():
    # Workers (and replacements for killed ones) fork from a server process that imported math-verify and warmed
    # it up once (eval.grading_server), so one starts warm in milliseconds instead of each paying ~1 s; the server
    # is a fresh process, safe where a plain fork of this one (torch/vLLM threads) is not. If other code started
    # the server first, without this preload, each worker imports and warms up on its own.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "eval.grading_server"])
    return context


class _Worker:
    """One grading process with a pipe; it holds up to two batches (one being graded, one queued) and answers
    in order, several items a message; `current` (shared memory) holds the index of the item it is grading."""

    def __init__(self, context):
        self.conn, child_conn = context.Pipe()
        self.current = context.RawValue("q", -1)
        self.process = context.Process(target=_worker_loop, args=(child_conn, self.current), daemon=True)
        self.process.start()
        child_conn.close()
        self.ready = False  # until it says so: the first item must not pay for start-up (imports, sympy warm-up)
        self.batch: deque[int] = deque()  # indices sent and not yet answered, in the order it grades them
        self.deadline = time.monotonic() + _WORKER_START_TIMEOUT_S
        self.timeout_s = 0.0

    def submit(self, items: list[tuple[int, tuple]], timeout_s: float) -> None:
        if not self.batch:  # otherwise the clock of the item it is grading runs on
            self.deadline = time.monotonic() + timeout_s + KILL_GRACE_S + SEND_EVERY_S
        self.batch.extend(i for i, _ in items)
        self.timeout_s = timeout_s
        self.conn.send((items, timeout_s))

    def receive(self) -> list[tuple[int, Grade]]:
        """(index, Grade) of the items graded since its last message ([] for the start-up message)."""
        message = self.conn.recv()
        if message == "ready":
            self.ready = True
            return []
        # no message for longer than one item may take (timeout, grace, the wait to send) means it is stuck
        self.deadline = time.monotonic() + self.timeout_s + KILL_GRACE_S + SEND_EVERY_S
        graded = []
        return [(self.batch.popleft(), result) for result in message]

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _worker_loop(conn, current) -> None:
    # timeouts are enforced here and by the parent, so math-verify's "timeout is disabled" warning is noise
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    signal.signal(signal.SIGALRM, _over_time)
    grade("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}")  # warm up sympy and the LaTeX parser
    conn.send("ready")
    while True:
        try:
            items, timeout_s = conn.recv()
        except EOFError:
            return
        graded: list = []
        sent_at = time.monotonic()
        for n, (index, (completion, gold, gold_is_latex, finish_reason)) in enumerate(items):
            current.value = index  # a memory write, no system call: the parent reads it if it has to kill us
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                try:
                    result = grade(completion, gold, gold_is_latex=gold_is_latex, finish_reason=finish_reason)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except OverTime:  # the timer fired after grade returned, before it was stopped
                result = TIMEOUT
            except Exception as error:  # this item is `error`; the rest of the batch goes on
                result = Grade("error", False, "", error=f"{type(error).__name__}: {error}"[:500])
            graded.append(result)
            if n == len(items) - 1 or time.monotonic() - sent_at >= SEND_EVERY_S:
                conn.send(graded)
                graded, sent_at = [], time.monotonic()


def _over_time(signum, frame) -> None:
    raise OverTime
