"""`teachers`: which source to distil from, with evidence ("Not All Correct Answers Are Equal", arXiv 2505.14464).

Input (`teachers`): two or more graded sample steps (`verify` outputs) over the same problems: different teachers, or
one teacher at different temperatures or prompts. Each is named by its step. Every statistic is computed over the
problems all of them share, so the sources are compared on the same questions, and per problem where it matters.

Per teacher:
    pass rate           mean over problems of correct / graded samples (pass@1), ± stderr; and by difficulty: each
                        problem's `level` column when the samples have one, else its pass rate over all teachers'
                        samples together, bucketed hard (< 1/3), medium (< 2/3), easy
    correct lengths     token counts of the correct traces: mean, median, p90 and coefficient of variation (sd /
                        mean, the paper's length diversity); mean by difficulty. Tokens of the student's tokenizer
                        (the tokens it would train on, as `completion_token_ids` counts them) when `student` is set,
                        else the samples' `completion_tokens`
    distinct answers    per problem, distinct extracted answers / graded samples, averaged over problems
    near duplicates     share of correct traces whose word n-gram Jaccard similarity with an earlier correct trace of
                        the same problem and teacher reaches `near_duplicate` (traces that add nothing new)
    student NLL         with `student`: the student's negative log-likelihood per token of each correct trace, over
                        exactly the tokens SFT would train on; averaged per problem, then over problems (± stderr).
                        Lower: closer to what the student already writes, the paper's signal for the best source

Ranking: each teacher is ranked on pass rate (higher is better), student NLL (lower; when `student` is set) and length
diversity (higher CV); the order is by mean rank, ties by pass rate. The report says why the first is first, and
compares it with each other teacher paired over problems (pass rate, and NLL where both have scored traces), with
`eval.metrics.paired_difference`'s bootstrap interval.

Privileged teachers (`privileged`): opsd steps, whose teacher is the student itself shown a privileged context. Each
measured, before it trained, whether that teacher is better than the student (`pipeline.training.privileged_teacher`:
pass rate sampling with and without the context, and the student's NLL per token of its verified traces with and
without it); the report shows those numbers beside the sources, and says which privileged teachers are no better.

Output: every graded sample of every teacher (the columns all of them have) with `teacher`, `trace_tokens` (the
length above, correct traces) and `student_nll_per_token` (scored traces; null elsewhere): what `select` with
`from: best_teacher` or a teacher's name picks from. Beside it: `teacher_problems.jsonl` (per problem and teacher:
the stats above), `teachers.json` (per-teacher summary, ranking, paired comparisons), `report.md` and
`teachers.png` (written by report.py, beside this file). The student's scores are appended to the scratch dir batch
by batch, so a killed run resumes.

Just over 400 lines as one thing: the measurements above feed one per-problem table, summary and ranking, read
together; rendering them is in `report`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from typing import ClassVar

from pydantic import Field, field_validator

from pipeline.core.compute_dtype import DtypeSetting
from pipeline.core.errors import UserError
from pipeline.core.step import StepConfig, repeated, require_columns

REQUIRED_COLUMNS = ("id", "prompt", "completion", "label", "correct", "extracted", "sample_idx")
TEACHERS_JSON, PROBLEMS_JSONL, REPORT_MD, PLOT_PNG = "teachers.json", "teacher_problems.jsonl", "report.md", \
    "teachers.png"
SCORES_FILE = "student_scores.jsonl"  # scratch: (teacher, row) -> summed NLL and tokens, appended per batch
DIFFICULTY_BUCKETS = ((1 / 3, "hard"), (2 / 3, "medium"), (math.inf, "easy"))  # pooled pass rate below -> bucket


class Config(DtypeSetting, StepConfig):
    teachers: list[str] = Field(
        min_length=2, description="Graded sample steps (verify outputs) to compare, over the same problems; each "
                                  "teacher is named by its step.")
    student: str | None = Field(
        default=None, description="Model whose per-token NLL of each teacher's correct traces is measured "
                                  "(builtin:NAME, step:NAME, a local dir or a hub id); null: no NLL signal.")
    batch_size: int = Field(default=8, ge=1, description="Traces the student scores per forward pass.")
    max_length: int = Field(
        default=8192, ge=16, description="Longest prompt + trace (student tokens) scored; longer traces are "
                                         "left unscored and counted.")
    near_duplicate: float = Field(default=0.8, gt=0, le=1,
                                  description="Word n-gram Jaccard similarity from which two correct traces of a "
                                              "problem are near duplicates.")
    near_duplicate_ngram: int = Field(default=5, ge=1, description="Word n-gram size for near_duplicate.")
    privileged: list[str] = Field(
        default_factory=list,
        description="opsd steps (step:NAME) whose privileged-teacher check the report shows: pass rate and the "
                    "student's NLL of verified traces, with and without the privileged context.")

    produces: ClassVar[str] = "dataset"
    path_fields: ClassVar = ()
    libraries: ClassVar = ("torch", "transformers")
    uses_seed: ClassVar = False

    @field_validator("teachers")
    @classmethod
    def _distinct(cls, teachers: list[str]) -> list[str]:
        if repeated(teachers):
            raise ValueError(f"each teacher once: {', '.join(repeated(teachers))} repeated")
        return teachers

    @field_validator("input")
    @classmethod
    def _no_input(cls, value):
        if value is not None:
            raise ValueError("a teachers step reads the steps listed in `teachers`, not `input`")
        return value

    def dataset_inputs(self) -> list[str]:
        return list(self.teachers)

    def dtype_choice(self):
        return super().dtype_choice() if self.student else None  # the student's scoring is the one model run

    @field_validator("privileged")
    @classmethod
    def _step_refs(cls, privileged: list[str]) -> list[str]:
        for ref in privileged:
            if not ref.startswith("step:"):
                raise ValueError(f"{ref!r}: name an opsd step as step:NAME")
        if repeated(privileged):
            raise ValueError(f"each opsd step once: {', '.join(repeated(privileged))} repeated")
        return privileged

    def model_refs(self) -> list[str]:
        return ([self.student] if self.student else []) + self.privileged


def run(cfg: Config, inputs, out):
    from datasets import concatenate_datasets

    from pipeline.steps.teachers.report import plot_teachers, render_report

    graded = {name: inputs[name].dataset() for name in cfg.teachers}
    for name, dataset in graded.items():
        require_columns(dataset, REQUIRED_COLUMNS, step="teachers", source=name,
                        reads="graded samples (the output of a verify step)")
        if cfg.student is None:
            require_columns(dataset, ("completion_tokens",), step="teachers", source=name,
                            reads="completion_tokens for the trace lengths when no `student` is set")
    shared = shared_problems(graded)
    if not shared:
        raise UserError(f"teachers: steps {', '.join(cfg.teachers)} share no problem id; compare teachers over the "
                        "same problems")

    lengths, scores, unscored = trace_lengths_and_scores(cfg, graded, inputs, out)
    rows = {name: dataset.select_columns([c for c in (*REQUIRED_COLUMNS, "level") if c in dataset.column_names])
            .to_dict() for name, dataset in graded.items()}
    per_problem = problem_table(rows, lengths, scores, shared, cfg.near_duplicate_ngram, cfg.near_duplicate)
    summary = {name: teacher_summary([p for p in per_problem if p["teacher"] == name]) for name in cfg.teachers}
    ranking = rank_teachers(summary, with_nll=cfg.student is not None)
    comparisons = paired_comparisons(per_problem, ranking[0]["teacher"], cfg.teachers)

    out.dir.mkdir(parents=True, exist_ok=True)
    with open(out.dir / PROBLEMS_JSONL, "w") as file:
        for row in per_problem:
            file.write(json.dumps(row) + "\n")
    document = {"teachers": summary, "ranking": ranking, "comparisons": comparisons, "student": cfg.student,
                "problems_shared": len(shared),
                "problems_not_shared": {name: len(set(rows[name]["id"]) - shared) for name in cfg.teachers},
                "unscored_too_long": unscored, "privileged": privileged_checks(cfg, inputs)}
    (out.dir / TEACHERS_JSON).write_text(json.dumps(document, indent=2) + "\n")
    (out.dir / REPORT_MD).write_text(render_report(document))
    plot_teachers(document, per_problem, out.dir / PLOT_PNG)

    columns = [c for c in graded[cfg.teachers[0]].column_names if all(c in d.column_names for d in graded.values())]
    parts = []
    for name, dataset in graded.items():
        part = dataset.select_columns(columns)
        part = part.add_column("teacher", [name] * len(part))
        part = part.add_column("trace_tokens", [lengths.get((name, row)) for row in range(len(part))])
        nll = [scores[(name, row)][0] / scores[(name, row)][1] if (name, row) in scores else None
               for row in range(len(part))]
        parts.append(part.add_column("student_nll_per_token", nll))
    try:
        merged = concatenate_datasets([parts[0]] + [part.cast(parts[0].features) for part in parts[1:]])
    except (ValueError, TypeError) as error:
        raise UserError(f"teachers: the graded samples of {', '.join(cfg.teachers)} have columns of different "
                        f"types and cannot be put in one dataset ({error})") from None
    best = ranking[0]["teacher"]
    return out.write_dataset(merged, best_teacher=best, ranking=[entry["teacher"] for entry in ranking],
                             why=ranking[0]["why"], problems_shared=len(shared), unscored_too_long=unscored,
                             **{f"pass_rate/{name}": summary[name]["pass_rate"] for name in cfg.teachers},
                             **({f"student_nll/{name}": summary[name]["nll_per_token"] for name in cfg.teachers}
                                if cfg.student else {}))


def privileged_checks(cfg: Config, inputs) -> dict:
    """Each `privileged` opsd step's teacher check, from its manifest."""
    checks = {}
    for ref in cfg.privileged:
        name = ref.removeprefix("step:")
        check = inputs[name].stats.get("teacher_check")
        if check is None:
            raise UserError(f"teachers: privileged {ref}: step {name!r} has no teacher check in its manifest (an opsd "
                            "step with teacher_check_problems above 0 records one)")
        checks[name] = check
    return checks


def shared_problems(graded: dict) -> set:
    """Problem ids every teacher's samples have."""
    ids = [set(dataset["id"]) for dataset in graded.values()]
    return set.intersection(*ids)


def trace_lengths_and_scores(cfg: Config, graded: dict, inputs, out):
    """(teacher, row) -> token length of each correct trace, (teacher, row) -> (summed NLL, tokens) of each scored
    one, and how many were too long to score. Without a student the lengths are the samples' completion_tokens."""
    if cfg.student is None:
        lengths = {(name, row): tokens for name, dataset in graded.items()
                   for row, (tokens, correct) in enumerate(zip(dataset["completion_tokens"], dataset["correct"]))
                   if correct}
        return lengths, {}, 0

    from transformers import AutoTokenizer

    from pipeline.core.console import progress
    from pipeline.core.models import resolve_model
    from pipeline.text.columns import arrow_columns
    from pipeline.text.rows import assistant_texts
    from pipeline.training.template_check import trained_token_ids
    from pipeline.training.token_logprobs import load_scoring_model, score_traces

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.student, inputs))
    if not tokenizer.chat_template:
        raise UserError(f"teachers: student {cfg.student!r} has no chat template to render the traces with")
    traces, lengths, unscored = [], {}, 0  # traces: ((teacher, row), token ids, first trained position)
    for name, dataset in graded.items():
        texts = assistant_texts(arrow_columns(dataset, [c for c in ("completion", "think_prefix")
                                                        if c in dataset.column_names])).to_pylist()
        for row, (prompt, text, correct) in enumerate(zip(dataset["prompt"], texts, dataset["correct"])):
            if not correct:
                continue
            ids, start = trained_token_ids(tokenizer, list(prompt), text)
            lengths[(name, row)] = len(ids) - start
            if len(ids) > cfg.max_length:
                unscored += 1
                continue
            traces.append(((name, row), ids, start))

    out.scratch.mkdir(parents=True, exist_ok=True)
    scores_path = out.scratch / SCORES_FILE
    scores = {}
    if scores_path.exists():  # an interrupted run's batches; a line a kill cut short is cut off, and rescored
        text = scores_path.read_text()
        text = text[:text.rfind("\n") + 1]
        scores_path.write_text(text)
        for line in text.splitlines():
            entry = json.loads(line)
            scores[(entry["teacher"], entry["row"])] = (entry["nll"], entry["tokens"])
    todo = sorted((trace for trace in traces if trace[0] not in scores), key=lambda trace: len(trace[1]))
    if todo:
        model = load_scoring_model(resolve_model(cfg.student, inputs), who="teachers: student",
                                   dtype=cfg.dtype_choice().dtype)
        with progress(total=len(traces), unit="traces", completed=len(traces) - len(todo)) as bar, \
                open(scores_path, "a") as file:
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start:start + cfg.batch_size]
                for (key, _, _), (nll, tokens) in zip(batch, score_traces(model, tokenizer, batch)):
                    scores[key] = (nll, tokens)
                    file.write(json.dumps({"teacher": key[0], "row": key[1], "nll": nll, "tokens": tokens}) + "\n")
                file.flush()
                bar.advance(len(batch))
    return lengths, scores, unscored


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


def near_duplicate_count(texts: list[str], n: int, threshold: float) -> int:
    """How many of `texts` reach `threshold` word n-gram Jaccard similarity with an earlier one (a problem's few
    correct traces: all pairs)."""
    grams = [word_ngrams(text, n) for text in texts]
    count = 0
    for i, mine in enumerate(grams):
        if any(mine and earlier and len(mine & earlier) / len(mine | earlier) >= threshold for earlier in grams[:i]):
            count += 1
    return count


def difficulty_of(pooled_pass_rate: float) -> str:
    return next(name for below, name in DIFFICULTY_BUCKETS if pooled_pass_rate < below)


def problem_table(rows: dict, lengths: dict, scores: dict, shared: set, ngram: int, threshold: float) -> list[dict]:
    """One dict per (shared problem, teacher), problems in the first teacher's order: see the module docstring."""
    from eval.answers import GRADED

    by_problem = {name: defaultdict(list) for name in rows}  # teacher -> problem id -> its rows, by sample_idx
    for name, columns in rows.items():
        for row in sorted(range(len(columns["id"])), key=lambda r: columns["sample_idx"][r]):
            if columns["id"][row] in shared:
                by_problem[name][columns["id"][row]].append(row)
    first = next(iter(rows))
    order = list(dict.fromkeys(pid for pid in rows[first]["id"] if pid in shared))
    table = []
    for pid in order:
        graded_rows = {name: [r for r in by_problem[name][pid] if rows[name]["label"][r] in GRADED] for name in rows}
        pooled_graded = sum(len(found) for found in graded_rows.values())
        pooled_correct = sum(rows[name]["correct"][r] for name in rows for r in graded_rows[name])
        levels = {rows[name]["level"][r] for name in rows if "level" in rows[name] for r in by_problem[name][pid]}
        if len(levels) == 1 and all("level" in columns for columns in rows.values()):
            difficulty = str(next(iter(levels)))
        else:
            difficulty = difficulty_of(pooled_correct / pooled_graded) if pooled_graded else None
        for name, columns in rows.items():
            mine, graded = by_problem[name][pid], graded_rows[name]
            correct = [r for r in graded if columns["correct"][r]]
            scored = [scores[(name, r)] for r in correct if (name, r) in scores]
            table.append({
                "id": pid, "teacher": name, "difficulty": difficulty, "samples": len(mine), "graded": len(graded),
                "correct": len(correct), "pass_rate": len(correct) / len(graded) if graded else None,
                "correct_tokens": [lengths[(name, r)] for r in correct if (name, r) in lengths],
                "distinct_answer_rate": (len({columns["extracted"][r] for r in graded}) / len(graded)
                                         if graded else None),
                "near_duplicates": near_duplicate_count([columns["completion"][r] for r in correct], ngram,
                                                        threshold),
                "nll_per_token": (statistics.fmean(nll / tokens for nll, tokens in scored if tokens)
                                  if any(tokens for _, tokens in scored) else None),
            })
    return table


def ordered_difficulties(names) -> list[str]:
    """Difficulty names hard to easy when they are the pass-rate buckets; levels in their natural order."""
    buckets = [name for _, name in DIFFICULTY_BUCKETS]
    return sorted(set(names), key=lambda name: (buckets.index(name) if name in buckets else len(buckets), name))


def mean_and_stderr(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def teacher_summary(problems: list[dict]) -> dict:
    """One teacher's signals over its rows of the problem table."""
    graded = [p for p in problems if p["pass_rate"] is not None]
    pass_rate, pass_stderr = mean_and_stderr([p["pass_rate"] for p in graded])
    tokens = sorted(t for p in problems for t in p["correct_tokens"])
    nll, nll_stderr = mean_and_stderr([p["nll_per_token"] for p in problems if p["nll_per_token"] is not None])
    difficulties = ordered_difficulties(p["difficulty"] for p in graded if p["difficulty"] is not None)
    by_difficulty = {}
    for difficulty in difficulties:
        bucket = [p for p in graded if p["difficulty"] == difficulty]
        bucket_tokens = [t for p in bucket for t in p["correct_tokens"]]
        by_difficulty[difficulty] = {"problems": len(bucket),
                                     "pass_rate": statistics.fmean(p["pass_rate"] for p in bucket),
                                     "correct_tokens_mean": statistics.fmean(bucket_tokens) if bucket_tokens else None}
    correct = sum(p["correct"] for p in problems)
    return {
        "problems": len(problems), "graded_problems": len(graded), "samples": sum(p["samples"] for p in problems),
        "correct_traces": correct, "pass_rate": pass_rate, "pass_rate_stderr": pass_stderr,
        "by_difficulty": by_difficulty,
        "correct_tokens": None if not tokens else {
            "mean": statistics.fmean(tokens), "median": statistics.median(tokens),
            "p90": tokens[min(len(tokens) - 1, math.ceil(0.9 * len(tokens)) - 1)],
            "cv": statistics.pstdev(tokens) / statistics.fmean(tokens) if statistics.fmean(tokens) else None},
        "distinct_answer_rate": (statistics.fmean(p["distinct_answer_rate"] for p in graded) if graded else None),
        "near_duplicate_rate": sum(p["near_duplicates"] for p in problems) / correct if correct else None,
        "nll_per_token": nll, "nll_per_token_stderr": nll_stderr,
    }


# (signal, how it reads from a summary, whether higher is better, how the report names it)
SIGNALS = (("pass_rate", lambda s: s["pass_rate"], True, "pass rate"),
           ("nll_per_token", lambda s: s["nll_per_token"], False, "student NLL per token"),
           ("length_cv", lambda s: (s["correct_tokens"] or {}).get("cv"), True, "length diversity (CV)"))


def rank_teachers(summary: dict, *, with_nll: bool) -> list[dict]:
    """Teachers best first, by mean rank over the signals (1 = best on that signal; a teacher without a value ranks
    last on it), ties by pass rate then name; each entry says its ranks and, for the first, why."""
    signals = [signal for signal in SIGNALS if with_nll or signal[0] != "nll_per_token"]
    ranks = {name: {} for name in summary}
    for key, read, higher, _ in signals:
        valued = sorted((name for name in summary if read(summary[name]) is not None),
                        key=lambda name: -read(summary[name]) if higher else read(summary[name]))
        for name in summary:
            ranks[name][key] = valued.index(name) + 1 if name in valued else len(summary)
    order = sorted(summary, key=lambda name: (statistics.fmean(ranks[name].values()),
                                              -(summary[name]["pass_rate"] or 0.0), name))
    ranking = [{"teacher": name, "mean_rank": statistics.fmean(ranks[name].values()), "ranks": ranks[name]}
               for name in order]
    best = order[0]
    reasons = [f"{label} {_value(key, read(summary[best]))} (rank {ranks[best][key]} of {len(summary)})"
               for key, read, _, label in signals]
    ranking[0]["why"] = (f"{best} has the best mean rank ({ranking[0]['mean_rank']:.2f}) over "
                         f"{len(signals)} signals: " + "; ".join(reasons))
    return ranking


def _value(key: str, value) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if key == "pass_rate" else f"{value:.3f}"


def paired_comparisons(per_problem: list[dict], best: str, teachers: list[str]) -> dict:
    """The best teacher minus each other one, paired over problems: pass rate (problems both graded) and student
    NLL per token (problems where both have scored correct traces)."""
    from eval.metrics import paired_difference

    by_teacher = {name: {p["id"]: p for p in per_problem if p["teacher"] == name} for name in teachers}
    comparisons = {}
    for other in teachers:
        if other == best:
            continue
        entry = {}
        for key in ("pass_rate", "nll_per_token"):
            shared = [pid for pid, p in by_teacher[best].items()
                      if p[key] is not None and by_teacher[other][pid][key] is not None]
            entry[key] = paired_difference([by_teacher[other][pid][key] for pid in shared],
                                           [by_teacher[best][pid][key] for pid in shared]) if shared else None
        comparisons[other] = entry
    return comparisons
