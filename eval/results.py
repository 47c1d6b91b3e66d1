"""An evaluation's results: grading its samples, scoring them, writing them, reading them back to re-grade
(`rescore`), and the terminal table. Written into the output dir:

    samples/       one row per sample (datasets.save_to_disk): benchmark, id, model, sample_idx, answer, subject,
                   level, completion, extracted, label, correct, prompt_tokens, completion_tokens, finish_reason
    results.json   {"models": {LABEL: {BENCHMARK: {"pass@1", "stderr", "n", "pass@k", "maj@k", ...}}},
                    "meta": {seed, sampling, n, prompt template, per model path / weights and chat-template
                    sha256 / think prefix, benchmark files and sha256, library versions}}
                   LABEL and BENCHMARK are written as the user named them, in the order given.
    report.md, accuracy.png, lengths.png   (eval/report.py)
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

from pipeline.core.artifacts import write_json_atomic
from pipeline.core.errors import UserError

SAMPLES_DIR = "samples"
RESULTS_JSON = "results.json"
# what re-grading reads of each sample (the rest it writes)
SAMPLE_COLUMNS = ("benchmark", "id", "model", "sample_idx", "answer", "completion", "finish_reason",
                  "completion_tokens")


def grade_score_and_write(rows: list[dict], meta: dict, out_dir: Path) -> dict:
    """Grade rows in place (per model's completion prefix, per benchmark's gold format), score them, compare every
    model with the baseline on the same problems, and write the outputs."""
    import datasets

    from eval.metrics import benchmark_scores, compare_to_baseline, removed_problems
    from eval.report import write_report
    from pipeline.core.console import progress

    with progress("grading", total=len(rows), unit="samples") as bar:
        _grade(rows, meta, bar.advance)
        bar.phase("grouping equivalent answers (maj@k)")
        groups = _answer_groups(rows, meta["grader"])

    results: dict[str, dict[str, dict]] = {label: {} for label in meta["models"]}
    for spec, n in meta["n"].items():
        benchmark_rows = [r for r in rows if r["benchmark"] == spec]
        removed = removed_problems(benchmark_rows)  # the same problems leave every model's score
        for label in meta["models"]:
            results[label][spec] = benchmark_scores([r for r in benchmark_rows if r["model"] == label], n,
                                                    groups=groups[(label, spec)], removed=removed)
    document = {"models": results, "meta": meta}
    if len(results) > 1:
        # runs from before comparisons existed have no baseline recorded: theirs was the first model
        meta.setdefault("baseline", next(iter(results)))
        document["comparisons"] = compare_to_baseline(results, meta["baseline"], seed=meta["seed"])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_samples(datasets.Dataset.from_list(rows), out_dir / SAMPLES_DIR)
    write_json_atomic(out_dir / RESULTS_JSON, document)
    write_report(document, rows, out_dir)
    return document


def rescore(run_dir: Path, *, workers: int | None = None, timeout_s: float | None = None) -> dict:
    """Re-grade a finished evaluation's saved completions (no generation) and rewrite its outputs."""
    from pipeline.core.env import library_versions

    run_dir = Path(run_dir)
    meta, rows = _read_evaluation(run_dir)
    if workers is not None or timeout_s is not None:
        meta["grader"] = {"workers": workers or meta["grader"]["workers"],
                          "timeout_s": timeout_s or meta["grader"]["timeout_s"]}
    meta["rescored"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": library_versions()}
    return grade_score_and_write(rows, meta, run_dir)


def save_samples(dataset, path: Path) -> None:
    # next to the old copy, then swapped: a crash while rescoring never leaves samples/ half written
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp), num_shards=1)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _grade(rows: list[dict], meta: dict, advance) -> None:
    """Set each row's extracted, label, correct and grade_error; `advance()` once per graded row."""
    from eval.grading_pool import iter_grades

    completions = [meta["models"][r["model"]]["completion_prefix"] + r["completion"] for r in rows]
    gold_format = [meta["benchmarks"][r["benchmark"]]["gold_is_latex"] for r in rows]
    for gold_is_latex in dict.fromkeys(gold_format):  # one worker pool per gold format
        indices = [i for i, is_latex in enumerate(gold_format) if is_latex == gold_is_latex]
        grades = iter_grades([completions[i] for i in indices], [rows[i]["answer"] for i in indices],
                             workers=meta["grader"]["workers"], timeout_s=meta["grader"]["timeout_s"],
                             finish_reasons=[rows[i]["finish_reason"] for i in indices],
                             gold_is_latex=gold_is_latex)
        for position, grade in grades:
            rows[indices[position]].update(extracted=grade.extracted, label=grade.label, correct=grade.correct,
                                           grade_error=grade.error)
            advance()


def _answer_groups(rows: list[dict], grader: dict) -> dict[tuple[str, str], dict[str, list[int]]]:
    """(model, benchmark) -> problem id -> the maj@k answer group of each graded sample, in sample order, grouped
    by math-verify equivalence in the grading pool (a problem it cannot group in time is grouped by text)."""
    from eval.grading_pool import iter_answer_groups
    from eval.metrics import graded_by_problem, text_groups

    rows_by_pair: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        rows_by_pair[(row["model"], row["benchmark"])].append(row)
    keys, answers = [], []
    for (model, spec), pair_rows in rows_by_pair.items():
        for problem_id, samples in graded_by_problem(pair_rows).items():
            keys.append((model, spec, problem_id))
            answers.append([s["extracted"] or "" for s in samples])
    groups: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(dict)
    for index, problem_groups in iter_answer_groups(answers, workers=grader["workers"], timeout_s=grader["timeout_s"]):
        model, spec, problem_id = keys[index]
        groups[(model, spec)][problem_id] = text_groups(answers[index]) if problem_groups is None else problem_groups
    return groups


def _read_evaluation(run_dir: Path) -> tuple[dict, list[dict]]:
    """The meta of an evaluation's results.json and its samples' rows, checked for everything re-grading reads: a
    results.json or samples/ that is not an evaluation's is refused naming it and what is wrong."""
    import datasets

    results_path, samples_path = run_dir / RESULTS_JSON, run_dir / SAMPLES_DIR
    if not results_path.is_file() or not samples_path.is_dir():
        raise UserError(f"--rescore {run_dir}: not an evaluation output (needs {RESULTS_JSON} and {SAMPLES_DIR}/)")
    try:
        document = json.loads(results_path.read_text())
    except (OSError, ValueError) as error:  # a UnicodeDecodeError is a ValueError
        raise UserError(f"{results_path}: cannot be read as JSON ({error})") from None
    meta = document.get("meta") if isinstance(document, dict) else None
    problem = _meta_problem(meta)
    if problem:
        raise UserError(f"{results_path}: not the results.json of an evaluation: {problem}")
    try:
        samples = datasets.load_from_disk(str(samples_path))
    except (OSError, ValueError, KeyError, TypeError) as error:  # what datasets raises for a dir it did not save
        raise UserError(f"{samples_path}: not a saved dataset ({error})") from None
    missing = [column for column in SAMPLE_COLUMNS if column not in samples.column_names]
    if missing:
        raise UserError(f"{samples_path}: not the samples of an evaluation (no column {', '.join(missing)})")
    rows = samples.to_list()
    for row in rows:
        if row["model"] not in meta["models"] or row["benchmark"] not in meta["n"]:
            raise UserError(f"{samples_path}: row id {row['id']!r}: model {row['model']!r} or benchmark "
                            f"{row['benchmark']!r} is not one of {results_path}'s meta")
    return meta, rows


def _meta_problem(meta) -> str | None:
    """What in a results.json's meta re-grading could not read, or None."""
    if not isinstance(meta, dict):
        return "no `meta`"
    models, n, benchmarks, grader = (meta.get(key) for key in ("models", "n", "benchmarks", "grader"))
    if not isinstance(models, dict) or not models or not all(
            isinstance(model, dict) and isinstance(model.get("completion_prefix"), str) for model in models.values()):
        return "meta.models is not model -> {completion_prefix, ...}"
    if not isinstance(n, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                          for v in n.values()):
        return "meta.n is not benchmark -> samples per problem"
    if not isinstance(benchmarks, dict) or not all(
            isinstance(benchmarks.get(spec), dict) and isinstance(benchmarks[spec].get("gold_is_latex"), bool)
            for spec in n):
        return "meta.benchmarks is not benchmark -> {gold_is_latex, ...} for every benchmark of meta.n"
    if not isinstance(grader, dict) or not all(isinstance(grader.get(key), (int, float)) and grader[key] > 0
                                               for key in ("workers", "timeout_s")):
        return "meta.grader is not {workers, timeout_s}"
    if not isinstance(meta.get("seed"), int) or isinstance(meta.get("seed"), bool):
        return "meta.seed is not an integer"
    return None


def print_table(document: dict) -> None:
    """Models x benchmarks, pass@1 ± stderr in percent; then each model minus the baseline, paired."""
    from rich.table import Table

    from pipeline.core.console import user_console

    results = document["models"]
    specs = list(next(iter(results.values())))
    table = Table(title="pass@1 (%) ± stderr")
    table.add_column("model")
    for spec in specs:
        table.add_column(spec, justify="right")
    for ref, per_bench in results.items():
        cells = []
        for spec in specs:
            scores = per_bench[spec]
            stderr = f" ± {100 * scores['stderr']:.1f}" if scores["stderr"] is not None else ""
            cells.append(f"{100 * scores['pass@1']:.1f}{stderr}  (n={scores['n']})")
        table.add_row(ref, *cells)
    console = user_console()  # the run's headline: on the terminal, also while the step's output goes to its log
    console.print(table)
    comparisons = document.get("comparisons")
    if not comparisons:
        return
    baseline = next(iter(next(iter(comparisons.values())).values()))["baseline"]
    table = Table(title=f"minus {baseline}, paired over problems (points)")
    for column in ("model", "benchmark", "difference ± stderr", "95% bootstrap", "detectable", "MDD"):
        table.add_column(column, justify="left" if column in ("model", "benchmark", "detectable") else "right")
    for spec in specs:
        for ref, row in comparisons[spec].items():
            low, high = row["ci95"]
            stderr = f" ± {100 * row['stderr']:.1f}" if row["stderr"] is not None else ""
            table.add_row(ref, spec, f"{100 * row['difference']:+.1f}{stderr}",
                          f"[{100 * low:+.1f}, {100 * high:+.1f}]",
                          "yes" if row["detectable"] else "no detectable difference",
                          "–" if row["mdd"] is None else f"{100 * row['mdd']:.1f}")
    console.print(table)
