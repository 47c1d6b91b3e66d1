"""Benchmark scores from graded samples, and paired comparisons between models.

    benchmark_scores     one model on one benchmark: pass@1 ± stderr, unbiased pass@k, maj@k over answers grouped
                         by math-verify equivalence, truncation, lengths, labels, per-problem counts
    removed_problems     the problems no score counts, for every model alike (the ungraded rule below)
    paired_difference    model minus baseline over the same problems: mean ± paired stderr, a seeded 95%
                         paired-bootstrap interval, and the minimum detectable difference
    compare_to_baseline  paired_difference for every model and benchmark of a results document

The ungraded rule (eval/answers.py): a sample labelled bad_gold, timeout or error was not graded, so it leaves the
denominator -- a problem's pass rate is correct / graded samples -- and a problem with no graded sample for some
model leaves the benchmark for every model, so that all models are scored, and compared, on the same problems.

Inputs are per problem: `correct_matrix[i]` holds the booleans of problem i's graded samples, in sample order.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from eval.answers import UNGRADED

CONFIDENCE = 0.95
POWER = 0.80  # of the minimum detectable difference
BOOTSTRAP_RESAMPLES = 10_000


def pass_at_1(correct_matrix: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """(mean, standard error) over problems of each problem's fraction of correct samples.

    The standard error is the sample standard deviation (ddof=1) of the per-problem rates over sqrt(problems):
    the spread of the benchmark score if the problems were redrawn. It is nan for a single problem.
    """
    if not correct_matrix or any(len(samples) == 0 for samples in correct_matrix):
        raise ValueError("pass@1 needs at least one problem and at least one sample per problem")
    return _mean_and_stderr([sum(map(bool, samples)) / len(samples) for samples in correct_matrix])


def mean_and_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; nan for a single value)."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, math.nan
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


def _mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    mean, sd = mean_and_sd(values)
    return mean, sd / math.sqrt(len(values))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples with c correct (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct_matrix: Sequence[Sequence[bool]], k: int) -> float:
    """The benchmark's pass@k: the unbiased estimate of each problem, averaged over problems."""
    if not correct_matrix:
        raise ValueError("pass@k needs at least one problem")
    return sum(pass_at_k(len(s), sum(map(bool, s)), k) for s in correct_matrix) / len(correct_matrix)


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to n: the k reported for pass@k and maj@k."""
    return [2 ** e for e in range(n.bit_length())] if n >= 1 else []


def text_groups(answers: Sequence[str]) -> list[int]:
    """Answer groups by exact text (-1 for ""): the fallback where math-verify could not group a problem's answers
    in time. eval.answers.answer_groups gives the same numbering with equivalent answers merged."""
    numbers: dict[str, int] = {}
    return [numbers.setdefault(answer, len(numbers)) if answer else -1 for answer in answers]


def maj_at_k(groups: Sequence[Sequence[int]], correct_matrix: Sequence[Sequence[bool]], k: int) -> float:
    """Fraction of problems whose majority answer among the first k samples is correct.

    `groups[i][j]` is the answer group of problem i's sample j (eval.answers.answer_groups: answers math-verify
    finds equal share a group; -1 = no answer, which does not vote). Ties: among the groups with the most votes,
    the one whose first vote came earliest wins, so the result depends only on the samples. The winning group
    is right if its first sample is. A problem with no answer at all counts as wrong.
    """
    if len(groups) != len(correct_matrix) or not groups:
        raise ValueError("maj@k needs one groups row and one correctness row per problem, and at least one problem")
    solved = 0
    for problem_groups, problem_correct in zip(groups, correct_matrix):
        if len(problem_groups) < k or len(problem_correct) != len(problem_groups):
            raise ValueError(f"maj@{k} needs at least {k} samples per problem, groups and correctness aligned")
        votes = Counter(g for g in problem_groups[:k] if g >= 0)
        if not votes:
            continue
        top_count = max(votes.values())
        winner = next(g for g in problem_groups[:k] if votes.get(g) == top_count)
        solved += bool(problem_correct[list(problem_groups).index(winner)])
    return solved / len(groups)


def graded_by_problem(samples: Iterable[dict]) -> dict[str, list[dict]]:
    """Each problem's graded samples in sample order (every problem present, possibly with none), problems in
    the order their ids first appear."""
    by_problem: dict[str, list[dict]] = {}
    for s in sorted(samples, key=lambda s: s["sample_idx"]):
        by_problem.setdefault(s["id"], [])
        if s["label"] not in UNGRADED:
            by_problem[s["id"]].append(s)
    return by_problem


def removed_problems(samples: Iterable[dict]) -> dict[str, str]:
    """Problems that leave a benchmark for every model (the ungraded rule): id -> why, the ungraded label
    (bad_gold before timeout before error) of a model that has no graded sample of it."""
    by_model_problem: dict[tuple[str, str], list[str]] = defaultdict(list)
    for s in samples:
        by_model_problem[(s.get("model", ""), s["id"])].append(s["label"])
    removed: dict[str, str] = {}
    for (_, problem_id), labels in by_model_problem.items():
        if all(label in UNGRADED for label in labels) and problem_id not in removed:
            removed[problem_id] = next(label for label in UNGRADED if label in labels)
    return removed


def benchmark_scores(samples: Sequence[dict], n: int, *, groups: dict[str, list[int]] | None = None,
                     removed: dict[str, str] | None = None) -> dict:
    """Every metric of one model on one benchmark, from its graded samples.

    Each sample is a dict with `id`, `sample_idx`, `correct`, `extracted`, `label`, `finish_reason`,
    `completion_tokens`, and optional `subject` / `level` (MATH-500), which add `by_subject` / `by_level` pass@1.
    `groups`: per problem id, the answer group of each graded sample in sample order (default: by exact text).
    `removed`: problems no model is scored on (`removed_problems` over all models); this model's problems without
    a graded sample are removed too. Scores count graded samples of the remaining problems only (see the module
    docstring); `labels` counts every sample.
    """
    removed = dict(removed or {})
    removed.update((pid, why) for pid, why in removed_problems(samples).items() if pid not in removed)
    problems = {pid: group for pid, group in graded_by_problem(samples).items() if pid not in removed}
    if not problems:
        raise ValueError("no problem has a graded sample: nothing to score")
    kept = [s for s in samples if s["id"] in problems]
    correct_matrix = [[bool(s["correct"]) for s in group] for group in problems.values()]
    group_matrix = [(groups or {}).get(pid) or text_groups([s["extracted"] or "" for s in group])
                    for pid, group in problems.items()]
    mean, stderr = pass_at_1(correct_matrix)
    ks = powers_of_two(min(len(flags) for flags in correct_matrix))
    graded = [s for group in problems.values() for s in group]
    tokens = {"all": [s["completion_tokens"] for s in kept],
              "correct": [s["completion_tokens"] for s in graded if s["correct"]],
              "incorrect": [s["completion_tokens"] for s in graded if not s["correct"]]}
    scores = {
        "pass@1": mean,
        "stderr": _finite_or_none(stderr),
        "n": n,
        "problems": len(problems),
        "samples": len(samples),
        "graded_samples": len(graded),
        "pass@k": {str(k): mean_pass_at_k(correct_matrix, k) for k in ks},
        "maj@k": {str(k): maj_at_k(group_matrix, correct_matrix, k) for k in ks},
        "truncation_rate": sum(s["finish_reason"] == "length" for s in kept) / len(kept),
        "mean_completion_tokens": {name: (sum(v) / len(v) if v else None) for name, v in tokens.items()},
        "labels": dict(Counter(s["label"] for s in samples)),
        # what the ungraded rule took out: problems (for every model) and, of the problems kept, samples
        "removed_problems": dict(Counter(removed[pid] for pid in dict.fromkeys(s["id"] for s in samples)
                                         if pid in removed)),
        "ungraded_samples": dict(Counter(s["label"] for s in kept if s["label"] in UNGRADED)),
        "per_problem": {pid: [sum(flags), len(flags)] for pid, flags in zip(problems, correct_matrix)},
    }
    for field in ("subject", "level"):
        by_value = _groups(list(problems.values()), correct_matrix, field)
        if by_value:
            scores[f"by_{field}"] = by_value
    return scores


def _groups(problems: list[list[dict]], correct_matrix: list[list[bool]], field: str) -> dict[str, dict]:
    """pass@1 ± stderr per value of `field` (e.g. MATH-500 subject), in sorted order; {} if no problem has one."""
    members: dict[str, list[list[bool]]] = defaultdict(list)
    for group, flags in zip(problems, correct_matrix):
        value = group[0].get(field)
        if value not in (None, ""):
            members[str(value)].append(flags)
    result = {}
    for value in sorted(members, key=_natural):
        mean, stderr = pass_at_1(members[value])
        result[value] = {"pass@1": mean, "stderr": _finite_or_none(stderr), "problems": len(members[value])}
    return result


def _natural(text: str) -> list:
    # "Level 10" after "Level 9"
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _finite_or_none(value: float) -> float | None:
    # JSON has no nan: a standard error that does not exist (one problem) is written as null
    return value if math.isfinite(value) else None


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def paired_difference(baseline: Sequence[float], other: Sequence[float], *, seed: int = 0,
                      resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """other - baseline over the same problems (per-problem pass rates, aligned).

    difference  the mean of the per-problem differences (= the difference of the two pass@1)
    stderr      their sample standard deviation / sqrt(problems): the paired standard error, smaller than the
                unpaired one whenever the two models find the same problems hard
    ci95        the 2.5th and 97.5th percentiles of the mean difference over `resamples` bootstrap resamplings of
                the problems (numpy's default_rng(seed): the same inputs give the same interval)
    detectable  whether the interval excludes 0; "no detectable difference" otherwise
    mdd         the minimum detectable difference: the true difference a two-sided test at 5% would find 80% of
                the time with this many problems and this spread, (z_0.975 + z_0.80) x stderr. A difference
                smaller than this is one the benchmark slice cannot answer.
    """
    import numpy as np

    if len(baseline) != len(other) or not baseline:
        raise ValueError("a paired difference needs the same problems, at least one, for both models")
    differences = np.asarray(other, dtype=float) - np.asarray(baseline, dtype=float)
    mean, stderr = _mean_and_stderr(differences.tolist())
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    block = max(1, 2_000_000 // len(differences))  # bounded memory on MATH-500-sized slices
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        means[start:start + size] = differences[rng.integers(0, len(differences), (size, len(differences)))].mean(1)
    tail = (1 - CONFIDENCE) / 2
    low, high = (float(q) for q in np.quantile(means, [tail, 1 - tail]))
    z = _normal_quantile(1 - tail) + _normal_quantile(POWER)
    return {"difference": mean, "stderr": _finite_or_none(stderr), "ci95": [low, high], "problems": len(differences),
            "detectable": not low <= 0 <= high, "mdd": _finite_or_none(z * stderr)}


def compare_to_baseline(models: dict[str, dict[str, dict]], baseline: str, *, seed: int = 0) -> dict:
    """{benchmark: {model: paired_difference(baseline -> model) | baseline's own row}} for every model but the
    baseline, over the problems both were scored on (`per_problem` of benchmark_scores)."""
    comparisons: dict[str, dict] = {}
    for benchmark, base_scores in models[baseline].items():
        base = base_scores["per_problem"]
        comparisons[benchmark] = {}
        for label, per_bench in models.items():
            if label == baseline:
                continue
            other = per_bench[benchmark]["per_problem"]
            shared = [pid for pid in base if pid in other]
            comparisons[benchmark][label] = {"baseline": baseline, **paired_difference(
                [base[pid][0] / base[pid][1] for pid in shared], [other[pid][0] / other[pid][1] for pid in shared],
                seed=seed)}
    return comparisons
