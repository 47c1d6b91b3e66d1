"""eval.metrics against hand computations and brute-force definitions."""

import itertools
import math

import pytest

from eval.metrics import (
    benchmark_scores,
    compare_to_baseline,
    maj_at_k,
    mean_pass_at_k,
    paired_difference,
    pass_at_1,
    pass_at_k,
    powers_of_two,
    removed_problems,
    text_groups,
)


def maj(answers, correct, k):
    return maj_at_k([text_groups(row) for row in answers], correct, k)


def test_pass_at_1_mean_and_stderr_by_hand():
    # per-problem rates 1/2, 1, 0 -> mean 1/2; sample variance ((0)^2 + (1/2)^2 + (1/2)^2) / 2 = 1/4
    mean, stderr = pass_at_1([[True, False], [True, True], [False, False]])
    assert mean == pytest.approx(0.5)
    assert stderr == pytest.approx(math.sqrt(0.25 / 3))


def test_pass_at_1_uneven_n_and_edge_cases():
    assert pass_at_1([[True, False, False, False], [True]])[0] == pytest.approx((0.25 + 1) / 2)
    mean, stderr = pass_at_1([[True, True, False]])
    assert mean == pytest.approx(2 / 3) and math.isnan(stderr)
    assert pass_at_1([[True], [True]]) == (1.0, 0.0)
    with pytest.raises(ValueError):
        pass_at_1([])
    with pytest.raises(ValueError):
        pass_at_1([[True], []])


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # fewer than k wrong samples: some correct one is always drawn
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_maj_at_k_by_hand():
    answers = [["3", "4", "4", "5"], ["7", "8", "", ""], ["", "", "", ""], ["1", "2", "2", "1"]]
    correct = [[False, True, True, False], [False, True, False, False], [False] * 4, [False, True, True, False]]
    # p0: "4" wins (2 votes) -> right. p1: 1-1 tie, "7" seen first -> wrong. p2: no answers -> wrong.
    # p3 at k=4: 2-2 tie, "1" first -> wrong; at k=3: "2" wins -> right
    assert maj(answers, correct, 4) == pytest.approx(1 / 4)
    assert maj(answers, correct, 3) == pytest.approx(2 / 4)
    assert maj(answers, correct, 1) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        maj(answers, correct, 5)


def brute_force_pass_at_k(flags, k):
    """The definition: the fraction of all k-subsets of the n samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(flags, k))
    return sum(any(subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("flags", [
    [True, False, False, False, False, False, False, False],
    [False, True, True, False, False, True, False, False],
    [False] * 8,
    [True] * 8,
    [False, False, False, True, False, False, False, True, False, False, False, False, False, False, False, False],
])
def test_pass_at_k_equals_the_subset_definition(flags):
    for k in range(1, len(flags) + 1):
        assert pass_at_k(len(flags), sum(flags), k) == pytest.approx(brute_force_pass_at_k(flags, k))


def test_mean_pass_at_k_averages_problems():
    matrix = [[True, False, False, False], [True, True, False, False], [False] * 4]
    assert mean_pass_at_k(matrix, 2) == pytest.approx((0.5 + (1 - 1 / 6) + 0) / 3)
    assert mean_pass_at_k(matrix, 1) == pytest.approx(pass_at_1(matrix)[0])


def test_powers_of_two():
    assert powers_of_two(1) == [1]
    assert powers_of_two(4) == [1, 2, 4]
    assert powers_of_two(7) == [1, 2, 4]
    assert powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64]


def test_maj_at_k_tie_goes_to_the_earliest_answer_whatever_its_correctness():
    # three-way 1-1-1 tie: the first sample's answer wins, right or wrong
    assert maj([["5", "6", "7"]], [[True, False, False]], 3) == 1.0
    assert maj([["6", "5", "7"]], [[False, True, False]], 3) == 0.0
    # 2-2 tie where the first vote of "9" comes before the first vote of "8"
    assert maj([["", "9", "8", "8", "9"]], [[False, True, False, False, True]], 5) == 1.0
    # empty answers never win, even when they are the most common
    assert maj([["", "", "", "3"]], [[False, False, False, True]], 4) == 1.0


def test_maj_at_k_votes_over_equivalent_answers():
    from eval.answers import answer_groups

    # 1/2 in three spellings is one answer with three votes; by text, "3" (two votes) would win
    answers = ["3", "\\frac{1}{2}", "3", "1/2", "0.5"]
    correct = [False, True, False, True, True]
    assert answer_groups(answers) == [0, 1, 0, 1, 1]
    assert maj_at_k([answer_groups(answers)], [correct], 5) == 1.0
    assert maj([answers], [correct], 5) == 0.0


def sample(pid, idx, correct, extracted, tokens, finish="stop", **extra):
    return {"id": pid, "sample_idx": idx, "correct": correct, "extracted": extracted, "completion_tokens": tokens,
            "finish_reason": finish, "label": "correct" if correct else ("truncated" if finish == "length"
                                                                         else "incorrect"), **extra}


def test_benchmark_scores_by_hand():
    samples = [
        # p1: 2 of 4 right; majority "2" (2 votes) is right
        sample("p1", 1, True, "2", 10, subject="Algebra", level=1),
        sample("p1", 0, True, "2", 20, subject="Algebra", level=1),  # out of order: sorted by sample_idx
        sample("p1", 2, False, "3", 30, subject="Algebra", level=1),
        sample("p1", 3, False, "", 100, "length", subject="Algebra", level=1),
        # p2: all wrong
        *(sample("p2", i, False, "7", 40, subject="Geometry", level=2) for i in range(4)),
    ]
    scores = benchmark_scores(samples, 4)
    assert scores["pass@1"] == pytest.approx(0.25)
    assert scores["stderr"] == pytest.approx(math.sqrt((0.25 ** 2 * 2) / 1 / 2))
    assert (scores["n"], scores["problems"], scores["samples"]) == (4, 2, 8)
    assert scores["pass@k"] == pytest.approx({"1": 0.25, "2": (1 - 1 / 6) / 2, "4": 0.5})
    # maj@1 reads sample 0 only ("2", right); maj@2 and maj@4: "2" wins on p1
    assert scores["maj@k"] == {"1": 0.5, "2": 0.5, "4": 0.5}
    assert scores["truncation_rate"] == pytest.approx(1 / 8)
    assert scores["mean_completion_tokens"] == pytest.approx({"all": 320 / 8, "correct": 15.0, "incorrect": 290 / 6})
    assert scores["labels"] == {"correct": 2, "incorrect": 5, "truncated": 1}
    assert scores["by_subject"] == {"Algebra": {"pass@1": 0.5, "stderr": None, "problems": 1},
                                    "Geometry": {"pass@1": 0.0, "stderr": None, "problems": 1}}
    assert list(scores["by_level"]) == ["1", "2"]


def test_benchmark_scores_without_groups_or_correct_samples():
    scores = benchmark_scores([sample("a", 0, False, "1", 5), sample("b", 0, False, "", 5)], 1)
    assert "by_subject" not in scores and "by_level" not in scores
    assert scores["mean_completion_tokens"]["correct"] is None
    assert scores["pass@k"] == {"1": 0.0} and scores["stderr"] == 0.0


def test_ungraded_samples_leave_the_denominator_and_empty_problems_leave_for_every_model():
    rows = [
        # p1: one timeout, then 1 of 2 graded right -> rate 1/2 (not 1/3)
        {**sample("p1", 0, False, "", 5), "label": "timeout"},
        sample("p1", 1, True, "2", 5), sample("p1", 2, False, "3", 5),
        # p2: bad gold -> removed; p3: model A's only sample errored -> removed for B too
        *({**sample("p2", i, False, "", 5), "label": "bad_gold"} for i in range(3)),
        *(sample("p3", i, True, "1", 5) for i in range(3)),
    ]
    a = [{**r, "model": "A"} for r in rows]
    b = [{**r, "model": "B", "label": "correct" if r["id"] == "p3" else r["label"]} for r in rows]
    a = [r if r["id"] != "p3" else {**r, "label": "error", "correct": False} for r in a]
    removed = removed_problems(a + b)
    assert removed == {"p2": "bad_gold", "p3": "error"}
    scores = benchmark_scores(b, 3, removed=removed)
    assert scores["pass@1"] == pytest.approx(0.5) and scores["problems"] == 1
    assert scores["per_problem"] == {"p1": [1, 2]}
    assert scores["removed_problems"] == {"bad_gold": 1, "error": 1}
    assert scores["ungraded_samples"] == {"timeout": 1}
    assert scores["pass@k"] == pytest.approx({"1": 0.5, "2": 1.0})  # k stops at the fewest graded samples (2)
    with pytest.raises(ValueError, match="no problem has a graded sample"):
        benchmark_scores([{**sample("p", 0, False, "", 5), "label": "timeout"}], 1)


def test_paired_difference_by_hand():
    # per-problem differences 1, 0, 0, 1 -> mean 1/2; sample sd sqrt(1/3); paired stderr sqrt(1/3)/2
    result = paired_difference([0, 1, 0, 0.5], [1, 1, 0, 1.5], seed=0)
    assert result["difference"] == pytest.approx(0.5)
    assert result["stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert result["mdd"] == pytest.approx((1.959964 + 0.841621) * math.sqrt(1 / 3) / 2, rel=1e-5)
    assert result["problems"] == 4
    # every resample's mean lies in [0, 1]; P(mean = 0) = P(mean = 1) = 1/16 > 2.5%: the interval is [0, 1]
    assert result["ci95"] == [0.0, 1.0] and not result["detectable"]


def test_paired_bootstrap_interval_matches_its_distribution_and_is_seeded():
    # two problems with differences 0 and 1: the bootstrap mean is 0, 1/2, 1 with probability 1/4, 1/2, 1/4
    assert paired_difference([0, 0], [0, 1], seed=3)["ci95"] == [0.0, 1.0]
    # a constant difference: the interval is that point, detectable
    constant = paired_difference([0.0] * 5, [0.25] * 5)
    assert constant["ci95"] == pytest.approx([0.25, 0.25]) and constant["detectable"] and constant["stderr"] == 0.0
    # 200 problems, +0.1 on 40 of them: interval near mean ± 1.96 paired stderr, identical for the same seed
    base, other = [0.0] * 200, [0.5] * 40 + [0.0] * 160
    first, again = paired_difference(base, other, seed=7), paired_difference(base, other, seed=7)
    assert first == again
    low, high = first["ci95"]
    assert first["difference"] == pytest.approx(0.1) and first["detectable"]
    assert low == pytest.approx(0.1 - 1.96 * first["stderr"], abs=0.01)
    assert high == pytest.approx(0.1 + 1.96 * first["stderr"], abs=0.01)
    with pytest.raises(ValueError):
        paired_difference([0.5], [0.5, 1])


def test_compare_to_baseline_pairs_only_shared_problems():
    models = {"A": {"b": {"per_problem": {"p1": [1, 2], "p2": [0, 4], "p3": [2, 2]}}},
              "B": {"b": {"per_problem": {"p1": [2, 2], "p2": [1, 4]}}}}
    row = compare_to_baseline(models, "A")["b"]["B"]
    assert row["baseline"] == "A" and row["problems"] == 2
    assert row["difference"] == pytest.approx(((1 - 0.5) + (0.25 - 0)) / 2)
