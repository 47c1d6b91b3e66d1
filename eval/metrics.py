"""Benchmark scores from per-sample results: pass@1 with its standard error, unbiased pass@k, maj@k, and the
per-benchmark summary (`benchmark_scores`) that results.json holds.

Inputs are per problem: `correct_matrix[i]` holds the n booleans of problem i's samples.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence


def pass_at_1(correct_matrix: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """(mean, standard error) over problems of each problem's fraction of correct samples.

    The standard error is the sample standard deviation (ddof=1) of the per-problem rates over sqrt(problems):
    the spread of the benchmark score if the problems were redrawn. It is nan for a single problem.
    """
    if not correct_matrix or any(len(samples) == 0 for samples in correct_matrix):
        raise ValueError("pass@1 needs at least one problem and at least one sample per problem")
    rates = [sum(map(bool, samples)) / len(samples) for samples in correct_matrix]
    mean = sum(rates) / len(rates)
    if len(rates) == 1:
        return mean, math.nan
    variance = sum((rate - mean) ** 2 for rate in rates) / (len(rates) - 1)
    return mean, math.sqrt(variance / len(rates))


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


def maj_at_k(answers: Sequence[Sequence[str]], correct_matrix: Sequence[Sequence[bool]], k: int) -> float:
    """Fraction of problems whose majority answer among the first k samples is correct.

    Answers are grouped by their extracted string; empty answers do not vote. Ties: among the answers with the
    most votes, the one whose first vote came earliest (lowest sample index) wins, so the result depends only on
    the samples, never on hash or dict order. A problem with no answer at all counts as wrong.
    """
    if len(answers) != len(correct_matrix) or not answers:
        raise ValueError("maj@k needs one answers row and one correctness row per problem, and at least one problem")
    solved = 0
    for problem_answers, problem_correct in zip(answers, correct_matrix):
        if len(problem_answers) < k or len(problem_correct) != len(problem_answers):
            raise ValueError(f"maj@{k} needs at least {k} samples per problem, answers and correctness aligned")
        votes = Counter(a for a in problem_answers[:k] if a)
        if not votes:
            continue
        top_count = max(votes.values())
        winner = next(a for a in problem_answers[:k] if votes.get(a) == top_count)
        solved += bool(problem_correct[list(problem_answers).index(winner)])
    return solved / len(answers)


def benchmark_scores(samples: Sequence[dict], n: int) -> dict:
    """Every metric of one model on one benchmark, from its graded samples.

    Each sample is a dict with `id`, `sample_idx`, `correct`, `extracted`, `label`, `finish_reason`,
    `completion_tokens`, and optional `subject` / `level` (MATH-500), which add `by_subject` / `by_level` pass@1.
    Problems keep the order in which their ids first appear; samples are ordered by `sample_idx` (maj@k reads the
    first k).
    """
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for sample in samples:
        by_problem[sample["id"]].append(sample)
    problems = [sorted(group, key=lambda s: s["sample_idx"]) for group in by_problem.values()]
    correct_matrix = [[bool(s["correct"]) for s in group] for group in problems]
    answers = [[s["extracted"] or "" for s in group] for group in problems]
    mean, stderr = pass_at_1(correct_matrix)
    ks = powers_of_two(min(len(group) for group in problems))
    tokens = {"all": [s["completion_tokens"] for s in samples],
              "correct": [s["completion_tokens"] for s in samples if s["correct"]],
              "incorrect": [s["completion_tokens"] for s in samples if not s["correct"]]}
    scores = {
        "pass@1": mean,
        "stderr": _finite_or_none(stderr),
        "n": n,
        "problems": len(problems),
        "samples": len(samples),
        "pass@k": {str(k): mean_pass_at_k(correct_matrix, k) for k in ks},
        "maj@k": {str(k): maj_at_k(answers, correct_matrix, k) for k in ks},
        "truncation_rate": sum(s["finish_reason"] == "length" for s in samples) / len(samples),
        "mean_completion_tokens": {name: (sum(v) / len(v) if v else None) for name, v in tokens.items()},
        "labels": dict(Counter(s["label"] for s in samples)),
    }
    for field in ("subject", "level"):
        groups = _groups(problems, correct_matrix, field)
        if groups:
            scores[f"by_{field}"] = groups
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
