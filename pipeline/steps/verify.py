"""`verify`: grade every completion against its gold answer with math-verify (eval/grader.py).

Input: a samples dataset (`id`, `answer`, `completion`; `finish_reason` if the sampler recorded it). Output: the
same rows plus `label`, `correct`, `extracted`, and `pass_rate` = the fraction of the problem's samples (same
`id`) that are correct. Needs no model, so a `load` -> `verify` recipe re-grades a file of completions.

Grades are appended to a scratch file as they finish, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import ClassVar

from pydantic import Field

from pipeline.artifacts import Artifact, Output
from pipeline.errors import UserError
from pipeline.steps import StepConfig

REQUIRED_COLUMNS = ("id", "answer", "completion")
PROGRESS_FILE = "grades.jsonl"


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
                                "so one that never closes </think> only scores with a \\boxed{} answer.")

    produces: ClassVar[str] = "dataset"


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    from eval.grader import LABELS, Grade, iter_grades

    samples = inputs[cfg.input].dataset()
    missing = [c for c in REQUIRED_COLUMNS if c not in samples.column_names]
    if missing:
        raise UserError(f"verify: dataset of step {cfg.input!r} has no column(s) {missing} "
                        f"(columns: {samples.column_names})")
    if len(samples) == 0:
        raise UserError(f"verify: dataset of step {cfg.input!r} has no rows")

    progress = out.scratch / PROGRESS_FILE
    grades = _read_progress(progress, len(samples))
    completions = [cfg.think_prefix + (text or "") for text in samples["completion"]]
    finish_reasons = samples["finish_reason"] if "finish_reason" in samples.column_names else None
    out.scratch.mkdir(parents=True, exist_ok=True)
    with open(progress, "a") as log:
        if log.tell() > 0:
            log.write("\n")  # a run killed mid-line left a torn line: keep it apart from the next one
        for index, result in iter_grades(completions, samples["answer"], workers=cfg.workers,
                                         timeout_s=cfg.timeout_s, finish_reasons=finish_reasons,
                                         gold_is_latex=cfg.gold_is_latex, skip=set(grades)):
            grades[index] = result
            log.write(json.dumps([index, result.label, result.correct, result.extracted]) + "\n")
    ordered: list[Grade] = [grades[i] for i in range(len(samples))]

    samples_per_id: dict[str, list[bool]] = defaultdict(list)
    for problem_id, result in zip(samples["id"], ordered):
        samples_per_id[problem_id].append(result.correct)
    pass_rates = {pid: sum(flags) / len(flags) for pid, flags in samples_per_id.items()}

    graded = (samples
              .add_column("label", [g.label for g in ordered])
              .add_column("correct", [g.correct for g in ordered])
              .add_column("extracted", [g.extracted for g in ordered])
              .add_column("pass_rate", [pass_rates[pid] for pid in samples["id"]]))
    label_counts = Counter(g.label for g in ordered)
    return out.write_dataset(
        graded,
        problems=len(pass_rates),
        mean_pass_rate=sum(pass_rates.values()) / len(pass_rates),
        problems_solved=sum(rate > 0 for rate in pass_rates.values()),
        **{f"label_{label}": label_counts[label] for label in LABELS},
    )


def _read_progress(path, rows: int) -> dict[int, "Grade"]:
    """Grades a killed run already wrote; a torn last line (killed mid-write) is dropped."""
    from eval.grader import Grade

    grades: dict[int, Grade] = {}
    if not path.exists():
        return grades
    with open(path) as f:
        for line in f:
            try:
                index, label, correct, extracted = json.loads(line)
            except ValueError:  # a torn or blank line
                continue
            if 0 <= index < rows:
                grades[index] = Grade(label, correct, extracted)
    return grades
