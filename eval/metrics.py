"""Benchmark scores from per-sample correctness: pass@1 with its standard error, unbiased pass@k, maj@k.

Inputs are per problem: `correct_matrix[i]` holds the n booleans of problem i's samples.
"""

from __future__ import annotations

import math
from collections import Counter
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


def maj_at_k(answers: Sequence[Sequence[str]], correct_matrix: Sequence[Sequence[bool]], k: int) -> float:
    """Fraction of problems whose majority answer among the first k samples is correct.

    Answers are grouped by their extracted string; empty answers do not vote, and a tie goes to the answer seen
    first. A problem with no answer at all counts as wrong.
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
