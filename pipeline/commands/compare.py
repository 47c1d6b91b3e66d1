"""`distill compare`: the evaluations of several runs (the seeds of `distill run --seeds`, or any runs of the
same evaluation) side by side, so that a difference between models is judged against the spread between runs.

For each evaluation (an evaluate step, by name, or `eval` for a `distill eval` output), model and benchmark:
    runs       pass@1 of each run (labelled by its seed when the seeds differ, else by its path)
    mean, sd   across runs (sd with ddof=1: the run-to-run spread, training and sampling seeds included)
    pooled     every run's samples of a problem together, then pass@1 ± stderr over the problems all runs share
and for each model but the baseline (the evaluation's `baseline`, else its first model):
    differences  each run's paired difference to the baseline and its 95% interval, their mean ± sd across runs,
                 in how many runs it was positive and in how many its 95% interval excluded 0
    pooled       the paired difference over problems of the pooled rates, with its bootstrap interval and MDD.
                 It takes each run's models as given: its interval covers which problems and which samples, not
                 training. Whether a training change helps is read from the per-run differences and their sd.

Writes nothing unless asked (`--out`, or `distill run --seeds` into the recipe's workdir): compare.json, compare.md.
A results.json that is not an evaluation's (another tool's, truncated, hand-edited) is refused naming the file and
what is wrong with it (`read_results`).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from pipeline.core.artifacts import MANIFEST, write_atomic, write_json_atomic
from pipeline.core.errors import UserError
from pipeline.core.workdir import SEED_DIR

RESULTS_JSON = "results.json"
COMPARE_JSON, COMPARE_MD = "compare.json", "compare.md"


def find_results(path: Path) -> list[tuple[str, Path]]:
    """(evaluation name, results.json) for everything `path` holds: a results.json, an evaluation dir, a workdir
    (its evaluate steps, in name order), or a --seeds workdir (its seed-N workdirs, by seed)."""
    if path.is_file():
        if path.name != RESULTS_JSON:
            raise UserError(f"{path}: not a {RESULTS_JSON}")
        return [(_evaluation_name(path.parent), path)]
    if not path.is_dir():
        raise UserError(f"{path}: no such file or directory")
    if (path / RESULTS_JSON).is_file():
        return [(_evaluation_name(path), path / RESULTS_JSON)]
    seed_dirs = sorted((p for p in path.iterdir() if p.is_dir() and SEED_DIR.fullmatch(p.name)),
                       key=lambda p: int(SEED_DIR.fullmatch(p.name).group(1)))
    found = [item for seed_dir in seed_dirs for item in find_results(seed_dir)]
    for step_dir in sorted(p for p in path.iterdir() if p.is_dir() and p not in seed_dirs):
        if (step_dir / RESULTS_JSON).is_file() and (step_dir / MANIFEST).is_file():
            found.append((_evaluation_name(step_dir), step_dir / RESULTS_JSON))
    return found


def _evaluation_name(directory: Path) -> str:
    try:
        return json.loads((directory / MANIFEST).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "eval"  # a `distill eval --out` dir


def compare_paths(paths: list[Path], baseline: str | None = None) -> dict:
    """{"evaluations": {name: comparison}} over every evaluation found in `paths` (see the module docstring);
    `baseline` replaces each evaluation's own (its differences are then computed from the per-problem counts)."""
    by_name: dict[str, list[tuple[Path, dict]]] = defaultdict(list)
    for path in paths:
        for name, results_path in find_results(Path(path)):
            by_name[name].append((results_path, read_results(results_path)))
    return {"evaluations": {name: compare_runs(runs, baseline) for name, runs in by_name.items()}}


def read_results(path: Path) -> dict:
    """A results.json, checked for everything a comparison reads from it."""
    try:
        document = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a results.json of an evaluation (not UTF-8 text)") from None
    except ValueError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror or error})") from None
    problem = _results_problem(document)
    if problem:
        raise UserError(f"{path}: not a results.json of an evaluation: {problem}")
    return document


def _results_problem(document) -> str | None:
    """What in `document` a comparison could not read, or None."""
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict) or not document["models"]:
        return "no `models` (model -> benchmark -> scores)"
    for model, per_bench in document["models"].items():
        if not isinstance(per_bench, dict):
            return f"models.{model} is not a mapping of benchmark -> scores"
        for benchmark, scores in per_bench.items():
            where = f"models.{model}.{benchmark}"
            if not isinstance(scores, dict) or not _is_number(scores.get("pass@1")):
                return f"{where} has no numeric pass@1"
            per_problem = scores.get("per_problem", {})
            if not isinstance(per_problem, dict) or not all(_is_counts(c) for c in per_problem.values()):
                return f"{where}.per_problem is not problem id -> [correct, graded], graded >= 1"
    meta, comparisons = document.get("meta", {}), document.get("comparisons", {})
    seed = meta.get("seed") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not (seed is None or isinstance(seed, int) and not isinstance(seed, bool)):
        return "meta is not a mapping with an integer seed"
    if not isinstance(comparisons, dict):
        return "comparisons is not a mapping"
    for benchmark, rows in comparisons.items():
        if not isinstance(rows, dict) or not all(isinstance(row, dict) and _is_number(row.get("difference"))
                                                 and "detectable" in row for row in rows.values()):
            return f"comparisons.{benchmark} is not model -> {{difference, detectable, ...}}"
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_counts(value) -> bool:
    """One problem's [correct, graded]: integers, 0 <= correct <= graded, graded >= 1."""
    return (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)
            and 0 <= value[0] <= value[1] and value[1] >= 1)


def compare_runs(runs: list[tuple[Path, dict]], baseline: str | None = None) -> dict:
    """One evaluation across runs: the models and benchmarks every run has, in the first run's order."""
    from eval.metrics import paired_difference

    documents = [document for _, document in runs]
    seeds = [document.get("meta", {}).get("seed") for document in documents]
    names = [f"seed {seed}" for seed in seeds] if len(set(seeds)) == len(seeds) else [str(p) for p, _ in runs]
    models = [m for m in documents[0]["models"] if all(m in d["models"] for d in documents)]
    benchmarks = [b for b in documents[0]["models"][models[0]]
                  if all(b in d["models"][m] for d in documents for m in models)] if models else []
    if baseline is not None and baseline not in models:
        raise UserError(f"--baseline {baseline!r}: not a model of every run (models: {', '.join(models)})")
    baseline = baseline or documents[0].get("meta", {}).get("baseline") or (models[0] if models else None)
    if baseline not in models:
        baseline = models[0] if models else None
    scores: dict[str, dict[str, dict]] = {}
    for model in models:
        scores[model] = {}
        for benchmark in benchmarks:
            per_run = [d["models"][model][benchmark] for d in documents]
            mean, sd = _mean_and_sd([s["pass@1"] for s in per_run])
            pooled = _pooled_rates(per_run)
            pooled_mean, pooled_stderr = _mean_and_stderr(list(pooled.values())) if pooled else (None, None)
            scores[model][benchmark] = {"runs": dict(zip(names, (s["pass@1"] for s in per_run))), "mean": mean,
                                        "sd": sd, "pooled": pooled_mean, "pooled_stderr": pooled_stderr,
                                        "pooled_problems": len(pooled)}
    differences: dict[str, dict[str, dict]] = {}
    for model in models:
        if model == baseline:
            continue
        differences[model] = {}
        for benchmark in benchmarks:
            per_run = [_run_difference(d, benchmark, model, baseline) for d in documents]
            values = [row["difference"] for row in per_run]
            mean, sd = _mean_and_sd(values)
            base_pooled = _pooled_rates([d["models"][baseline][benchmark] for d in documents])
            model_pooled = _pooled_rates([d["models"][model][benchmark] for d in documents])
            shared = [pid for pid in base_pooled if pid in model_pooled]
            pooled = paired_difference([base_pooled[p] for p in shared], [model_pooled[p] for p in shared]) \
                if shared else None
            differences[model][benchmark] = {
                "runs": dict(zip(names, values)), "mean": mean, "sd": sd,
                # each run's 95% paired interval (None where its results kept no per-problem counts)
                "runs_ci95": dict(zip(names, (row.get("ci95") for row in per_run))),
                "positive_runs": sum(v > 0 for v in values),
                "detectable_runs": sum(r["detectable"] is True for r in per_run),
                "pooled": pooled}
    return {"runs": names, "paths": [str(p) for p, _ in runs], "baseline": baseline, "models": models,
            "benchmarks": benchmarks, "scores": scores, "differences": differences}


def by_round(models_by_round: list[str], results_path: Path, document: dict) -> list[dict]:
    """pass@1 by round from one evaluation (`document`, its results.json at `results_path`): for each round whose
    model it holds (`models_by_round[k]`: round k's model, round 0 the one round 1 starts from), per benchmark, its
    pass@1 and stderr and its paired difference from the previous round it holds (None for the first). Empty when
    it holds fewer than two rounds' models."""
    evaluated = [(number, model) for number, model in enumerate(models_by_round) if model in document["models"]]
    if len(evaluated) < 2:
        return []
    rows = []
    for position, (number, model) in enumerate(evaluated):
        before = evaluated[position - 1][1] if position else None
        differences = compare_runs([(results_path, document)], before)["differences"] if before else {}
        for benchmark, scores in document["models"][model].items():
            rows.append({"round": number, "model": model, "benchmark": benchmark, "pass@1": scores["pass@1"],
                         "stderr": scores["stderr"],
                         "minus_round_before": differences.get(model, {}).get(benchmark, {}).get("pooled")})
    return rows


def _run_difference(document: dict, benchmark: str, model: str, baseline: str) -> dict:
    """One run's paired difference model - baseline: as its results recorded it, else computed from its
    per-problem counts, else (results from before either was kept) the plain difference of pass@1, undecided."""
    from eval.metrics import compare_to_baseline

    recorded = document.get("comparisons", {}).get(benchmark, {}).get(model)
    if recorded and recorded.get("baseline") == baseline:
        return recorded
    pair = {m: {benchmark: document["models"][m][benchmark]} for m in (baseline, model)}
    if all("per_problem" in scores[benchmark] for scores in pair.values()):
        return compare_to_baseline(pair, baseline, seed=document.get("meta", {}).get("seed") or 0)[benchmark][model]
    return {"difference": pair[model][benchmark]["pass@1"] - pair[baseline][benchmark]["pass@1"], "detectable": None}


def _pooled_rates(per_run: list[dict]) -> dict[str, float]:
    """Per problem shared by every run: correct / graded samples, all runs' samples together ({} for results
    written before per-problem counts were kept)."""
    if not all("per_problem" in scores for scores in per_run):
        return {}
    shared = [pid for pid in per_run[0]["per_problem"] if all(pid in s["per_problem"] for s in per_run)]
    return {pid: sum(s["per_problem"][pid][0] for s in per_run) / sum(s["per_problem"][pid][1] for s in per_run)
            for pid in shared}


def _mean_and_sd(values: list[float]) -> tuple[float, float | None]:
    from eval.metrics import mean_and_sd

    mean, sd = mean_and_sd(values)
    return mean, sd if math.isfinite(sd) else None  # JSON has no nan: one run has no spread


def _mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    mean, sd = _mean_and_sd(values)
    return mean, None if sd is None else sd / math.sqrt(len(values))


def _pct(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def _with_spread(mean: float, spread: float | None, sign: bool = False) -> str:
    return _pct(mean, sign) + ("" if spread is None else f" ± {_pct(spread)}")


def comparison_rows(evaluation: dict) -> tuple[list[list[str]], list[list[str]]]:
    """The two tables of one evaluation as rows of text: scores, then differences to the baseline."""
    runs = evaluation["runs"]
    score_rows = []
    for model, per_bench in evaluation["scores"].items():
        for benchmark, s in per_bench.items():
            score_rows.append([model, benchmark, *(_pct(s["runs"][r]) for r in runs), _with_spread(s["mean"], s["sd"]),
                               _with_spread(s["pooled"], s["pooled_stderr"]) if s["pooled"] is not None else "–"])
    difference_rows = []
    for model, per_bench in evaluation["differences"].items():
        for benchmark, d in per_bench.items():
            pooled = d["pooled"]
            pooled_text = "–" if pooled is None else (
                f"{_with_spread(pooled['difference'], pooled['stderr'], sign=True)} "
                f"[{_pct(pooled['ci95'][0], True)}, {_pct(pooled['ci95'][1], True)}]"
                + ("" if pooled["detectable"] else " no detectable difference") + f", MDD {_pct(pooled['mdd'])}")
            difference_rows.append([model, benchmark, *(_pct(d["runs"][r], True) for r in runs),
                                    _with_spread(d["mean"], d["sd"], sign=True),
                                    f"{d['positive_runs']}/{len(runs)}", f"{d['detectable_runs']}/{len(runs)}",
                                    pooled_text])
    return score_rows, difference_rows


def _headers(evaluation: dict) -> tuple[list[str], list[str]]:
    runs = evaluation["runs"]
    return (["model", "benchmark", *runs, "mean ± sd", "pooled ± stderr"],
            ["model", "benchmark", *runs, "mean ± sd", "positive", "detectable", "pooled paired [95%]"])


def print_comparison(comparison: dict, console) -> None:
    from rich.table import Table

    for name, evaluation in comparison["evaluations"].items():
        score_rows, difference_rows = comparison_rows(evaluation)
        score_header, difference_header = _headers(evaluation)
        for title, header, rows in (
                (f"{name}: pass@1 (%) across {len(evaluation['runs'])} run(s)", score_header, score_rows),
                (f"{name}: minus {evaluation['baseline']}, paired (points)", difference_header, difference_rows)):
            if not rows:
                continue
            table = Table(title=title)
            for column in header:
                table.add_column(column, justify="left" if column in ("model", "benchmark") else "right")
            for row in rows:
                table.add_row(*row)
            console.print(table)


def render_markdown(comparison: dict) -> str:
    lines = ["# Comparison across runs", "",
             "pass@1 (%) per run; mean ± sd across runs; pooled = every run's samples of a problem together, ± "
             "stderr over problems. Differences: model minus baseline, paired over problems, per run; mean ± sd "
             "across runs; in how many runs positive and detectable (95% paired-bootstrap interval excluding 0); "
             "pooled paired difference with its interval and minimum detectable difference (MDD).", ""]
    for name, evaluation in comparison["evaluations"].items():
        score_rows, difference_rows = comparison_rows(evaluation)
        score_header, difference_header = _headers(evaluation)
        lines += [f"## {name}", "", *_markdown_table(score_header, score_rows), ""]
        if difference_rows:
            lines += [f"Minus `{evaluation['baseline']}`:", "",
                      *_markdown_table(difference_header, difference_rows), ""]
        lines += ["Runs: " + ", ".join(f"{run} ({path})" for run, path in zip(evaluation["runs"], evaluation["paths"])),
                  ""]
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def write_comparison(comparison: dict, out_dir: Path) -> list[Path]:
    """compare.md and compare.json into `out_dir`, which the caller claimed (`pipeline.core.outputs`), each atomically."""
    write_json_atomic(out_dir / COMPARE_JSON, comparison)
    write_atomic(out_dir / COMPARE_MD, lambda tmp: tmp.write_text(render_markdown(comparison)))
    return [out_dir / COMPARE_MD, out_dir / COMPARE_JSON]
