"""`verify`: grade every completion against its gold answer with math-verify (eval.answers, run by eval.grading_pool).

Input: a samples dataset (`id`, `answer`, `completion`; `finish_reason` if the sampler recorded it). Output: the
same rows plus `label`, `correct`, `extracted`, `grade_error` (the exception, for label `error`; "" otherwise),
`graded_samples` (how many of the problem's samples were graded) and `pass_rate` = correct / graded samples of
the problem (same `id`). Needs no model, so a `load` -> `verify` recipe re-grades a file of completions.

The ungraded rule (eval/answers.py): a sample labelled bad_gold, timeout or error says nothing about the answer,
so it leaves the denominator; a problem none of whose samples were graded has no pass rate (null), is left out
of the pass-rate stats and is counted by label (`problems_ungraded_*`: bad_gold before timeout before error).
A row whose grading raised is kept, labelled `error`: one bad row never stops the step.

Grades are appended to a scratch file as they finish (error text included), so a killed run resumes where it
stopped.

Printed and in the manifest: counts per label (graded and ungraded apart), bad golds by problem id, the first
error rows with their messages, a pass-rate histogram. With `audit: true` every graded sample is also graded by a
second, independent method (normalised string / numeric comparison of the last boxed answer or last number
against the gold) and the rows where the two disagree go to `audit.jsonl` in the step dir, for a person to read.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from eval.answers import GRADED, LABELS, UNGRADED, Grade, last_boxed
from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.core.funnel import Count, FunnelStage
from pipeline.core.step import StepConfig, require_columns

REQUIRED_COLUMNS = ("id", "answer", "completion")
PROGRESS_FILE = "grades.jsonl"
AUDIT_FILE = "audit.jsonl"
HISTOGRAM_BINS = 10  # pass-rate buckets [0, 0.1), ..., [0.9, 1.0]
MAX_LISTED_ERRORS = 20  # error rows named in the manifest (all are counted, and kept in the dataset)


class Config(StepConfig):
    workers: int = Field(default=2, ge=1, description="Grading processes running math-verify in parallel.")
    timeout_s: float = Field(default=10.0, gt=0,
                             description="Seconds one completion may take to grade; past it the row is `timeout`.")
    gold_is_latex: bool | None = Field(
        default=None,
        description="How the `answer` column parses: null = integers as numbers and anything else as LaTeX, "
                    "true = always LaTeX (wrapped in $...$), false = plain expressions.")
    think_prefix: str = Field(
        default="", description="The sample step's think_prefix (e.g. '<think>\\n'): completions began inside it, "
                                "so one that never closes </think> only scores with a \\boxed{} answer. "
                                "A `think_prefix` column (written by the sample step) takes precedence.")
    audit: bool = Field(
        default=False, description="Also grade with a second, independent method (normalised string/numeric "
                                   "comparison) and write the disagreements to audit.jsonl in the step dir.")

    produces: ClassVar[str] = "dataset"
    path_fields: ClassVar = ()
    libraries: ClassVar = ("math-verify", "latex2sympy2_extended")
    uses_seed: ClassVar = False
    # 2: answers in prose, units and trailing punctuation read (eval/answers.py); ungraded rows and pass rates
    code_version: ClassVar = "2"


def funnel_stage(stats: dict) -> FunnelStage:
    """The run page's data funnel: graded samples by label, and the problems with a correct sample."""
    # every graded label, even at 0 (no correct sample is news); an ungraded one only where it happened
    labels = [Count(f"label_{label}", label, stats.get(f"label_{label}", 0)) for label in LABELS
              if label in GRADED or stats.get(f"label_{label}")]
    solved = Count("problems_solved", "problems with a correct sample", stats.get("problems_solved", 0))
    return FunnelStage("graded samples", stats.get("problems"), [*labels, solved])


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    import numpy as np
    import pyarrow as pa
    from datasets import Value

    from eval.grading_pool import iter_grades
    from pipeline.text.columns import arrow_columns, problem_index

    samples = inputs[cfg.input].dataset()
    require_columns(samples, REQUIRED_COLUMNS, step="verify", source=cfg.input)
    if len(samples) == 0:
        raise UserError(f"verify: dataset of step {cfg.input!r} has no rows")

    progress = out.scratch / PROGRESS_FILE
    grades = _read_progress(progress, len(samples))
    columns = arrow_columns(samples, [c for c in ("id", "answer", "completion", "think_prefix", "finish_reason")
                                      if c in samples.column_names])
    if "think_prefix" in columns.column_names:
        completions = LazyRows(lambda prefix, text: (prefix or "") + (text or ""), columns["think_prefix"],
                               columns["completion"])
    else:
        completions = LazyRows(lambda text: cfg.think_prefix + (text or ""), columns["completion"])
    finish_reasons = (LazyRows(lambda reason: reason, columns["finish_reason"])
                      if "finish_reason" in columns.column_names else None)
    out.scratch.mkdir(parents=True, exist_ok=True)
    with open(progress, "a") as log:
        if log.tell() > 0:
            log.write("\n")  # a run killed mid-line left a torn line: keep it apart from the next one
        for index, result in iter_grades(completions, LazyRows(lambda gold: gold, columns["answer"]),
                                         workers=cfg.workers, timeout_s=cfg.timeout_s, finish_reasons=finish_reasons,
                                         gold_is_latex=cfg.gold_is_latex,
                                         skip={i for i, grade in enumerate(grades) if grade is not None}):
            grades[index] = result
            log.write(json.dumps([index, result.label, result.correct, result.extracted, result.error]) + "\n")

    # Per-problem counts in numpy over problem numbers, not per-row Python dicts.
    codes, problem_ids = problem_index(columns["id"])
    label_of = np.array([LABELS.index(grade.label) for grade in grades], dtype=np.int64)
    correct = np.array([grade.correct for grade in grades], dtype=bool)
    graded_per_problem = np.bincount(codes, weights=label_of < len(GRADED), minlength=len(problem_ids)).astype(int)
    correct_per_problem = np.bincount(codes, weights=correct, minlength=len(problem_ids)).astype(int)
    has_rate = graded_per_problem > 0
    rate_of = np.divide(correct_per_problem, graded_per_problem, out=np.zeros(len(problem_ids)), where=has_rate)
    rates = rate_of[has_rate].tolist()
    # a problem without a graded sample counts under the first of UNGRADED among its labels, as in eval.metrics
    ungraded_problems, unassigned = Counter(), ~has_rate
    for label in UNGRADED:
        has_label = np.bincount(codes[label_of == LABELS.index(label)], minlength=len(problem_ids)) > 0
        ungraded_problems[label] = int((has_label & unassigned).sum())
        unassigned &= ~has_label
    label_counts = np.bincount(label_of, minlength=len(LABELS))
    error_rows = np.flatnonzero(label_of == LABELS.index("error"))[:MAX_LISTED_ERRORS].tolist()

    graded = (samples
              .add_column("label", pa.array([grade.label for grade in grades], type=pa.string()))
              .add_column("correct", pa.array(correct))
              .add_column("extracted", pa.array([grade.extracted for grade in grades], type=pa.string()))
              .add_column("grade_error", pa.array([grade.error for grade in grades], type=pa.string()))
              .add_column("graded_samples", pa.array(graded_per_problem[codes], type=pa.int64()))
              # typed: a column of nothing but nulls (no problem graded) must still read as a float column
              .add_column("pass_rate", pa.array(rate_of[codes], mask=~has_rate[codes], type=pa.float64()),
                          feature=Value("float64")))
    stats = {
        "problems": len(problem_ids),
        "problems_graded": len(rates),
        "mean_pass_rate": sum(rates) / len(rates) if rates else None,
        "problems_solved": sum(rate > 0 for rate in rates),
        **{f"label_{label}": int(label_counts[LABELS.index(label)]) for label in LABELS},
        **{f"problems_ungraded_{label}": ungraded_problems[label] for label in UNGRADED},
        "bad_gold_ids": sorted(problem_ids[code] for code in np.unique(codes[label_of == LABELS.index("bad_gold")])),
        "grade_errors": [{"row": row, "id": problem_ids[codes[row]], "error": grades[row].error} for row in error_rows],
        "pass_rate_histogram": pass_rate_histogram(rates),
    }
    if cfg.audit:
        stats.update(_audit(samples, completions, grades, out.dir / AUDIT_FILE))
    _print_summary(stats)
    return out.write_dataset(graded, **stats)


class LazyRows(Sequence):
    """Row i of some Arrow columns, read when asked and passed through `make`: the grading pool takes its items a
    batch at a time, so a million completions never sit in memory as Python strings all at once."""

    def __init__(self, make, *columns):
        import numpy as np

        self._make, self._columns = make, columns
        self._starts = [np.cumsum([0] + [len(chunk) for chunk in column.chunks]).tolist() for column in columns]

    def __len__(self) -> int:
        return len(self._columns[0])

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        values = []
        for column, starts in zip(self._columns, self._starts):
            chunk = bisect_right(starts, index) - 1
            values.append(column.chunks[chunk][index - starts[chunk]].as_py())
        return self._make(*values)


def pass_rate_histogram(rates: list[float]) -> dict[str, int]:
    """Problems per pass-rate bucket: "0.0-0.1": ..., "0.9-1.0": ... (1.0 falls in the last bucket)."""
    counts = [0] * HISTOGRAM_BINS
    for rate in rates:
        counts[min(int(rate * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    return {f"{b / HISTOGRAM_BINS:.1f}-{(b + 1) / HISTOGRAM_BINS:.1f}": c for b, c in enumerate(counts)}


def _print_summary(stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table


    total = sum(stats[f"label_{label}"] for label in GRADED + UNGRADED)
    table = Table(title="verify: labels", caption="below the line: ungraded, no pass rate counts them")
    table.add_column("label")
    table.add_column("samples", justify="right")
    table.add_column("%", justify="right")
    for label in GRADED + UNGRADED:
        count = stats[f"label_{label}"]
        table.add_row(label, str(count), f"{100 * count / total:.1f}", end_section=label == GRADED[-1])
    console = Console()
    console.print(table)
    console.print(f"pass rate per problem ({stats['problems_graded']} of {stats['problems']} with a graded sample): "
                  + "  ".join(f"{k}: {v}" for k, v in stats["pass_rate_histogram"].items()))
    ungraded = {label: stats[f"problems_ungraded_{label}"] for label in UNGRADED}
    if any(ungraded.values()):
        console.print("[yellow]problems with no graded sample (no pass rate), by label: "
                      + ", ".join(f"{label} {count}" for label, count in ungraded.items()))
    bad_gold_ids = stats["bad_gold_ids"]
    if bad_gold_ids:
        more = f" (+{len(bad_gold_ids) - 20} more)" if len(bad_gold_ids) > 20 else ""
        console.print(f"[yellow]bad golds (answer does not parse), by id: {', '.join(bad_gold_ids[:20])}{more}")
    if stats["label_error"]:
        listed = stats["grade_errors"]
        more = f" (first {len(listed)} listed in the manifest)" if stats["label_error"] > len(listed) else ""
        console.print(f"[red]{stats['label_error']} row(s) whose grading raised{more}; kept, labelled `error`:")
        for entry in listed[:5]:
            console.print(f"  row {entry['row']} (id {entry['id']}): {entry['error']}", style="red", markup=False)
    if "audit_disagreements" in stats:
        console.print(f"audit: {stats['audit_disagreements']} disagreement(s) with the normalised-comparison grader "
                      f"-> {AUDIT_FILE}")


# The audit grader: deliberately not math-verify. Answer = the last \boxed{...} after any </think>, else the
# last number; both sides normalised (LaTeX spacing and wrappers, thousands separators) and compared as
# numbers when both are numbers (fractions included), else as strings.
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\s+|\\text\{[^}]*\}|\.$")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_FRACTION = re.compile(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}|()(-?[\d.]+)/(-?[\d.]+)")


def normalised_answer(completion: str) -> str:
    """The audit grader's reading of a completion's final answer, normalised ("" if none)."""

    text = completion.rsplit("</think>", 1)[-1]
    boxed = last_boxed(text)
    if boxed is not None:
        return _normalise(boxed[boxed.index("{") + 1:-1])
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else ""


def _normalise(answer: str) -> str:
    answer = _LATEX_NOISE.sub("", answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    return answer.replace(",", "") if _NUMBER.fullmatch(answer) else answer


def _as_number(answer: str) -> float | None:
    try:
        return float(answer)
    except ValueError:
        pass
    match = _FRACTION.fullmatch(answer)
    if not match:
        return None
    sign, num, den = match.group(1, 2, 3) if match.group(2) else match.group(4, 5, 6)
    try:
        return (-1 if sign else 1) * float(num) / float(den)
    except (ValueError, ZeroDivisionError):
        return None


def audit_grade(completion: str, gold: str) -> tuple[bool, str]:
    """(correct by the audit grader, the answer it read)."""
    answer, gold = normalised_answer(completion), _normalise(str(gold))
    if not answer:
        return False, ""
    a, g = _as_number(answer), _as_number(gold)
    if a is not None and g is not None:
        return abs(a - g) <= 1e-6 * max(1.0, abs(g)), answer
    return answer == gold, answer


def _audit(samples, completions: list[str], grades: list, path) -> dict:
    """Write rows where math-verify and the audit grader disagree; ungraded rows (eval.answers.UNGRADED) are left
    out: math-verify decided nothing there to disagree with."""

    disagreements = 0
    rows = zip(samples["id"], samples["answer"], completions, grades)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for index, (problem_id, gold, completion, grade) in enumerate(rows):
            if grade.label in UNGRADED:
                continue
            audit_correct, audit_answer = audit_grade(completion, gold)
            if audit_correct != grade.correct:
                disagreements += 1
                f.write(json.dumps({"row": index, "id": problem_id, "gold": gold, "label": grade.label,
                                    "math_verify_extracted": grade.extracted, "audit_extracted": audit_answer,
                                    "audit_correct": audit_correct, "completion_tail": completion[-400:]}) + "\n")
    return {"audit_disagreements": disagreements}


def _read_progress(path, rows: int) -> list[Grade | None]:
    """Grades a killed run already wrote, by row (None: not graded yet); a torn last line (killed mid-write) is
    dropped. Equal grades (most of a problem's samples) share one object."""

    grades: list[Grade | None] = [None] * rows
    if not path.exists():
        return grades
    shared: dict[tuple, Grade] = {}
    with open(path) as f:
        for line in f:
            try:
                index, *fields = json.loads(line)  # label, correct, extracted, error
                grade = shared.get(tuple(fields)) or shared.setdefault(tuple(fields), Grade(*fields))
            except (ValueError, TypeError):  # a torn or blank line
                continue
            if isinstance(index, int) and 0 <= index < rows:
                grades[index] = grade
    return grades
