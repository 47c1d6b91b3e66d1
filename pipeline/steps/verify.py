"""`verify`: grade every completion against its gold answer with math-verify (eval.answers, run by eval.grading_pool),
or against its problem's majority answer where there is no gold; an LLM judge may settle what the rules could not.

Input: a samples dataset (`id`, `answer` (not with label majority), `completion`; `finish_reason` if the sampler
recorded it). Output: the same rows plus `label`, `correct`, `extracted`, `grade_error` (the exception, for label `error`; "" otherwise),
`graded_samples` (how many of the problem's samples were graded) and `pass_rate` = correct / graded samples of
the problem (same `id`). Needs no model, so a `load` -> `verify` recipe re-grades a file of completions.

The ungraded rule (eval/answers.py): a sample labelled bad_gold, no_majority, timeout or error says nothing about
the answer, so it leaves the denominator; a problem none of whose samples were graded has no pass rate (null), is
left out of the pass-rate stats and is counted by label (`problems_ungraded_*`, in eval.answers.UNGRADED's order).
A row whose grading raised is kept, labelled `error`: one bad row never stops the step.

Grades are appended to a scratch file as they finish (error text included; with label majority the answers read
for the vote too, answers.jsonl), so a killed run resumes where it stopped.

Labels without gold (`label: majority`, eval/majority.py): each problem's samples vote with their extracted
answers, grouped by math-verify equivalence; the top group is accepted with at least `min_votes` votes and
`min_share` of the votes and no tie, and every sample is graded against it (so `correct` and `pass_rate` mean
agreement with the majority). The `answer` column is not needed and, if present, ignored. A refused problem's rows
are `no_majority` (ungraded). Columns `majority_answer` (null when refused), `majority_share`, `runner_up_answer`,
`runner_up_share`; the manifest counts refusals by reason and lists them (`no_majority_ids`).

LLM-judge fallback (`judge:`, eval/judge.py): rows labelled incorrect or no_answer are put to a judge model with
a fixed, versioned prompt (against the gold, or the majority answer); a strict YES makes the row correct, NO
confirms it, anything else leaves it as graded (`judge_unparsed`). Column `graded_by` (judge / rules). Replies are
cached in the step's scratch (judge.jsonl), so a resumed run does not ask again; the judge's model and prompt
version are in the key (a local judge's model identity and dtype too).

A `published_correct` column (a dataset's own correctness flag, from load's explode) gets a confusion table against
our grades (`published_agreement` in the manifest, and printed).

Printed and in the manifest: counts per label (graded and ungraded apart), bad golds by problem id, the first
error rows with their messages, a pass-rate histogram. With `audit: true` every graded sample is also graded by a
second, independent method (normalised string / numeric comparison of the last boxed answer or last number
against the gold) and the rows where the two disagree go to `audit.jsonl` in the step dir, for a person to read.

One file past 400 lines because it is one flow: the label sources (gold, majority) and the judge pass feed the same
resumable grades, columns and counts; the voting, judging and agreement logic live in eval/.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from eval.agreement import audit_grade, published_agreement
from eval.answers import GRADED, LABELS, UNGRADED, Grade
from eval.judge import JudgeSettings
from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.core.funnel import Count, FunnelStage
from pipeline.core.step import StepConfig, require_columns

REQUIRED_COLUMNS = ("id", "answer", "completion")
MAJORITY_REQUIRED_COLUMNS = ("id", "completion")  # label majority: no gold needed
PROGRESS_FILE = "grades.jsonl"
ANSWERS_FILE = "answers.jsonl"  # label majority: each sample's answer, read before the vote
JUDGE_CACHE_FILE = "judge.jsonl"  # the judge's replies, by eval.judge.cache_key
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
    label: Literal["gold", "majority"] = Field(
        default="gold", description="What a sample is graded against. gold: the `answer` column. majority: the "
                                    "most common answer among the problem's samples (math-verify equivalence; "
                                    "the `answer` column, if any, is ignored); a problem without one is ungraded "
                                    "(`no_majority`). See eval/majority.py.")
    min_votes: int = Field(default=2, ge=1, description="label majority: least samples the majority answer needs.")
    min_share: float = Field(default=0.5, gt=0, le=1, description=(
        "label majority: least share of the problem's samples with an answer that the majority answer needs."))
    judge: JudgeSettings | None = Field(default=None, description=(
        "LLM-judge fallback: {model: REF} (local vLLM) or {base_url: URL, model: NAME} (an OpenAI-compatible "
        "server), plus max_tokens, prompt_version, dtype, max_model_len, api_key_env, max_concurrency, "
        "request_timeout. Asked (greedy, fixed prompt) only about rows labelled incorrect or no_answer; a YES makes "
        "the row correct, an unparsed reply leaves it as graded; `graded_by` says which. See eval/judge.py."))

    produces: ClassVar[str] = "dataset"
    path_fields: ClassVar = ()
    libraries: ClassVar = ("math-verify", "latex2sympy2_extended")
    uses_seed: ClassVar = False
    # 2: answers in prose, units and trailing punctuation read (eval/answers.py); ungraded rows and pass rates.
    # (label, min_votes, min_share, judge and the published_correct table: new options whose defaults write what
    # version 2 wrote, so they left it as it was)
    # 3: eval/answers.py 2026-12-05: base subscripts, normal-form equations, operands named after the answer,
    #    sign-offs, cut traces that computed on past a box or stopped mid-sentence (BENCHMARKS.md "Grader dev set")
    code_version: ClassVar = "3"
    keyed_when_set: ClassVar = ("label", "min_votes", "min_share", "judge")

    @model_validator(mode="after")
    def _majority_settings_with_majority(self) -> Config:
        # by value, not by model_fields_set: a config dumped and validated again (--dry-run, the launcher) sets every
        # field, and a gold step whose min_votes holds its default must stay valid
        moved = [name for name in ("min_votes", "min_share")
                 if getattr(self, name) != type(self).model_fields[name].get_default()]
        if self.label == "gold" and moved:
            raise ValueError("min_votes and min_share are settings of label: majority")
        if self.label == "majority" and self.gold_is_latex is not None:
            raise ValueError("gold_is_latex says how the `answer` column parses; label: majority does not read it")
        return self

    def model_refs(self) -> list[str]:
        return [self.judge.model] if self.judge is not None and self.judge.local else []

    def dtype_choice(self):
        if self.judge is None or not self.judge.local:
            return None  # no model runs here (a served judge's dtype is the server's)
        from pipeline.core.compute_dtype import choose

        return choose(self.judge.dtype)


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
    majority = cfg.label == "majority"
    require_columns(samples, MAJORITY_REQUIRED_COLUMNS if majority else REQUIRED_COLUMNS, step="verify",
                    source=cfg.input)
    if len(samples) == 0:
        raise UserError(f"verify: dataset of step {cfg.input!r} has no rows")
    wanted = ("id", "completion", "think_prefix", "finish_reason", "published_correct",
              *(() if majority else ("answer",)), *(("problem",) if cfg.judge is not None else ()))
    columns = arrow_columns(samples, [c for c in wanted if c in samples.column_names])
    if "think_prefix" in columns.column_names:
        completions = LazyRows(lambda prefix, text: (prefix or "") + (text or ""), columns["think_prefix"],
                               columns["completion"])
    else:
        completions = LazyRows(lambda text: cfg.think_prefix + (text or ""), columns["completion"])
    finish_reasons = (LazyRows(lambda reason: reason, columns["finish_reason"])
                      if "finish_reason" in columns.column_names else None)
    # Per-problem counts in numpy over problem numbers, not per-row Python dicts.
    codes, problem_ids = problem_index(columns["id"])
    out.scratch.mkdir(parents=True, exist_ok=True)

    if majority:
        votes, answers = _vote(cfg, completions, finish_reasons, codes, len(problem_ids), out.scratch)
        golds = [votes[code].answer for code in codes]
        grades = [None if gold is not None else Grade("no_majority", False, answer.extracted)
                  for gold, answer in zip(golds, answers)]
    else:
        golds, grades = LazyRows(lambda gold: gold, columns["answer"]), [None] * len(samples)
    grades = _grade_logged(out.scratch / PROGRESS_FILE, grades, lambda skip: iter_grades(
        completions, golds, workers=cfg.workers, timeout_s=cfg.timeout_s, finish_reasons=finish_reasons,
        gold_is_latex=cfg.gold_is_latex, skip=skip))
    judge_stats, graded_by = {}, None
    if cfg.judge is not None:
        grades, graded_by, judge_stats = _judge(cfg, inputs, grades, golds, completions, columns, out.scratch)

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
    if graded_by is not None:
        graded = graded.add_column("graded_by", pa.array(graded_by, type=pa.string()))
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
        **judge_stats,
    }
    if majority:
        from eval.majority import majority_columns, majority_stats

        for name, (values, feature) in majority_columns(votes, codes).items():
            graded = graded.add_column(name, values, feature=feature)
        stats.update(majority_stats(votes, problem_ids))
    if "published_correct" in columns.column_names:
        stats["published_agreement"] = published_agreement(grades, columns["published_correct"].to_pylist())
    if cfg.audit:
        stats.update(_audit(samples, golds, completions, grades, out.dir / AUDIT_FILE))
    _print_summary(stats)
    return out.write_dataset(graded, **stats)


def _grade_logged(path, grades: list[Grade | None], grade_rows) -> list[Grade]:
    """`grades` with each None filled: first from the progress file at `path` (a killed run's), then by
    `grade_rows(skip)`, which yields (row, Grade) for the rows not in `skip`; each new grade is appended to the file
    as it comes, so a killed run resumes where it stopped."""
    logged = _read_progress(path, len(grades))
    grades = [grade if grade is not None else logged[i] for i, grade in enumerate(grades)]
    with open(path, "a") as log:
        if log.tell() > 0:
            log.write("\n")  # a run killed mid-line left a torn line: keep it apart from the next one
        for index, result in grade_rows({i for i, grade in enumerate(grades) if grade is not None}):
            grades[index] = result
            log.write(json.dumps([index, result.label, result.correct, result.extracted, result.error]) + "\n")
    return grades


def _vote(cfg: Config, completions, finish_reasons, codes, problems: int, scratch):
    """label majority: each problem's Vote (eval.majority) and each sample's answer as read (a Grade)."""
    from eval.majority import VOTING_LABELS, read_answers, vote_all

    answers = _grade_logged(scratch / ANSWERS_FILE, [None] * len(completions), lambda skip: read_answers(
        completions, finish_reasons, workers=cfg.workers, timeout_s=cfg.timeout_s, skip=skip))
    per_problem: list[list[str]] = [[] for _ in range(problems)]
    for code, answer in zip(codes.tolist(), answers):
        per_problem[code].append(answer.extracted if answer.label in VOTING_LABELS else "")
    votes = vote_all(per_problem, min_votes=cfg.min_votes, min_share=cfg.min_share, workers=cfg.workers,
                     timeout_s=cfg.timeout_s)
    return votes, answers


def _judge(cfg: Config, inputs, grades, golds, completions, columns, scratch):
    """The judge's verdicts over the grades (eval.judge.judge_grades), with the local judge resolved."""
    from eval.judge import judge_grades
    from pipeline.core.models import resolve_model

    settings = cfg.judge
    model_dir = resolve_model(settings.model, inputs) if settings.local else None
    problems = (LazyRows(lambda text: text, columns["problem"]) if "problem" in columns.column_names else None)
    dtype = cfg.dtype_choice()
    return judge_grades(settings, grades, golds, completions, problems, scratch / JUDGE_CACHE_FILE,
                        model_dir=model_dir, dtype=dtype.dtype if dtype else "auto")


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
    if "majority_accepted" in stats:
        refused = {k.removeprefix("majority_refused_"): v for k, v in stats.items()
                   if k.startswith("majority_refused_") and v}
        console.print(f"majority: {stats['majority_accepted']} of {stats['problems']} problems accepted"
                      + (f"; no majority: {', '.join(f'{why} {n}' for why, n in refused.items())} "
                         f"(listed in the manifest, no_majority_ids)" if refused else ""))
    if "judge_eligible" in stats:
        console.print(f"judge ({stats['judge']}, prompt {stats['judge_prompt_version']}): {stats['judge_eligible']} "
                      f"row(s) eligible, {stats['judge_asked']} asked, {stats['judge_cached']} from the cache; "
                      f"YES {stats['judge_yes']}, NO {stats['judge_no']}, unparsed {stats['judge_unparsed']}")
    if "published_agreement" in stats:
        agreement = stats["published_agreement"]
        table = Table(title="verify vs published_correct (samples)")
        for heading in ("ours", "published true", "published false", "published null"):
            table.add_column(heading, justify="right" if heading != "ours" else "left")
        for ours in ("correct", "incorrect", "ungraded"):
            table.add_row(ours, *(str(agreement[ours][flag]) for flag in ("true", "false", "null")))
        console.print(table)
        if agreement["agreement"] is not None:
            console.print(f"agreement on {agreement['compared']} graded samples with a published flag: "
                          f"{100 * agreement['agreement']:.1f}%")
    if "audit_disagreements" in stats:
        console.print(f"audit: {stats['audit_disagreements']} disagreement(s) with the normalised-comparison grader "
                      f"-> {AUDIT_FILE}")


def _audit(samples, golds, completions: list[str], grades: list, path) -> dict:
    """Write rows where math-verify and the audit grader disagree; ungraded rows (eval.answers.UNGRADED) are left
    out: math-verify decided nothing there to disagree with."""

    disagreements = 0
    rows = zip(samples["id"], golds, completions, grades)
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
