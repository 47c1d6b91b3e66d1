"""The one math-verify wrapper: turns (completion, gold) into a label. Shared by the verify and evaluate steps.

Rules (DeepSeek-R1 / open-r1 / lighteval protocol):
- Only the text after the last `</think>` is read. A completion that opened `<think>` and never closed it, or
  that stopped at the token limit (finish_reason "length"), only counts a `\\boxed{}` answer: a number picked out
  of unfinished reasoning is not an answer.
- The last `\\boxed{}` wins. Without one, the answer is the last plain number, or the LaTeX math written after
  it (math-verify's plain-expression extraction would read "answer is 30 - 16 = 15" as 30 - 16).
- Golds: integers (AIME, AMC, GSM8K, "2,125" included) parse as numbers; anything else as LaTeX wrapped in
  `$...$` (MATH-500: unwrapped, many golds do not parse). A gold that still does not parse is `bad_gold`, reported
  rather than counted as a wrong answer.
- `verify(gold, prediction)`, gold first (math-verify is not symmetric).

math-verify's own timeouts use `signal.alarm`, which works only on a process's main thread. Here they are turned
off and `grade_many` enforces the time limit from outside: each item runs in a worker process, and a worker that
overruns is killed and replaced, its item labelled `timeout`. Labels drift between math-verify versions (this was
written against math-verify 0.9.0); pin it with latex2sympy2_extended and antlr4-python3-runtime.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait

LABELS = ("correct", "incorrect", "no_answer", "truncated", "timeout", "bad_gold")

_INTEGER = re.compile(r"[-+]?(\d+|\d{1,3}(,\d{3})+)")
_BOXED = re.compile(r"\\(boxed|fbox)\s*\{")
# a number, decimal or fraction a/b; a minus right after a word or bracket is subtraction, not a sign
_NUMBER = re.compile(r"(?:(?<![\w.)\]])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_LATEX_MATH = re.compile(r"\$|\\\(|\\\[")
_WORKER_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Grade:
    label: str  # one of LABELS
    correct: bool
    extracted: str  # the answer as read from the completion ("" when none)


TIMEOUT = Grade("timeout", False, "")


def grade(completion: str | None, gold: str | None, *, gold_is_latex: bool | None = None,
          finish_reason: str | None = None) -> Grade:
    """Grade one completion against its gold answer, in this process, with no time limit.

    gold_is_latex: None = integers as numbers, anything else as LaTeX; True = always LaTeX; False = a plain
    expression. Use `grade_many` for untrusted text: a pathological expression can keep sympy busy for hours.
    """
    from math_verify import verify

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
    return parse(answer_text, [LatexExtractionConfig()], parsing_timeout=None)


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
    """Yield (index, Grade) as items finish, in no fixed order; indices in `skip` are not graded."""
    if len(golds) != len(completions) or (finish_reasons is not None and len(finish_reasons) != len(completions)):
        raise ValueError("completions, golds and finish_reasons must have the same length")
    if workers < 1 or timeout_s <= 0:
        raise ValueError(f"need workers >= 1 and timeout_s > 0, got {workers} and {timeout_s}")
    pending = deque(i for i in range(len(completions)) if i not in skip)
    if not pending:
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch/vLLM threads exist
    pool = [_Worker(context) for _ in range(min(workers, len(pending)))]
    try:
        while pending or any(w.index is not None for w in pool):
            for worker in pool:
                if worker.index is None and pending:
                    i = pending.popleft()
                    reason = finish_reasons[i] if finish_reasons is not None else None
                    worker.submit(i, (completions[i], golds[i], gold_is_latex, reason), timeout_s)
            busy = [w for w in pool if w.index is not None]
            next_deadline = min(w.deadline for w in busy)
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic()))
            for k, worker in enumerate(pool):
                if worker.index is None:
                    continue
                index = worker.index
                if worker.conn in ready:
                    try:
                        yield index, worker.receive()
                        continue
                    except EOFError:  # the worker died (killed, out of memory): its item could not be graded
                        pass
                elif time.monotonic() < worker.deadline:
                    continue
                worker.kill()
                pool[k] = _Worker(context)
                yield index, TIMEOUT
    finally:
        for worker in pool:
            worker.kill()


class _Worker:
    """One grading process with a pipe; it holds at most one item at a time."""

    def __init__(self, context):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_worker_loop, args=(child_conn,), daemon=True)
        self.process.start()
        child_conn.close()
        self.index: int | None = None
        self.deadline = 0.0
        # the first item must not pay for start-up (imports, sympy warm-up) out of its time limit
        try:
            started = self.conn.poll(_WORKER_START_TIMEOUT_S) and self.conn.recv() == "ready"
        except EOFError:
            started = False
        if not started:
            self.kill()
            raise RuntimeError(f"a grading worker failed to start within {_WORKER_START_TIMEOUT_S:.0f} s")

    def submit(self, index: int, item: tuple, timeout_s: float) -> None:
        self.index, self.deadline = index, time.monotonic() + timeout_s
        self.conn.send(item)

    def receive(self) -> Grade:
        message = self.conn.recv()
        self.index = None
        if isinstance(message, BaseException):
            raise message
        return Grade(*message)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _worker_loop(conn) -> None:
    # timeouts are enforced by the parent, so math-verify's "timeout is disabled" warning is noise here
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    grade("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}")  # warm up sympy and the LaTeX parser
    conn.send("ready")
    while True:
        try:
            completion, gold, gold_is_latex, finish_reason = conn.recv()
        except EOFError:
            return
        try:
            result = grade(completion, gold, gold_is_latex=gold_is_latex, finish_reason=finish_reason)
            conn.send((result.label, result.correct, result.extracted))
        except Exception as error:  # hand it to the parent, which knows which row it was
            conn.send(RuntimeError(f"grading failed on {completion!r:.200} vs gold {gold!r}: {error!r}"))
