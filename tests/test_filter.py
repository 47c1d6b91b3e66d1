"""The filter step: truncated rows, pass-rate window, exact and near duplicates, benchmark decontamination."""

import json

import pytest
from pydantic import ValidationError

from eval.benchmarks import load_benchmark
from pipeline.core.errors import UserError
from pipeline.steps import filter as filter_step
from tests.step_runner import run_on_rows

LONG = ("A bag holds red, green and blue marbles in the ratio 2 : 3 : 5, and there are 40 marbles in all. "
        "How many blue marbles are there?")


def rows():
    _, math500 = load_benchmark("math500:1")
    problems = {
        "keep": LONG,
        "exact": "  a BAG holds red, green and blue marbles in the ratio 2 : 3 : 5, and there are 40 marbles in all. "
                 "How many blue marbles are there?",
        "near": LONG.replace("40 marbles", "50 marbles"),
        "leak": "Solve this: " + math500[0]["problem"],
        "easy": "What is 1 + 1?",
        "short": "What is 2 * 3?",
    }
    rates = {"easy": 1.0}
    out = []
    for problem_id, text in problems.items():
        for sample_idx, finish in enumerate(["stop", "length"] if problem_id == "keep" else ["stop"]):
            out.append({"id": problem_id, "problem": text, "sample_idx": sample_idx, "finish_reason": finish,
                        "pass_rate": rates.get(problem_id, 0.5)})
    return out


def run_filter(tmp_path, data, **config):
    artifact, kept = run_on_rows(filter_step, tmp_path, data, uses="filter", **config)
    removed = [json.loads(line) for line in (tmp_path / "out" / filter_step.REMOVED_FILE).read_text().splitlines()]
    return artifact, kept, removed


def test_every_filter_removes_its_problem_and_says_why(tmp_path):
    artifact, kept, removed = run_filter(tmp_path, rows(), drop_truncated=True, max_pass_rate=0.99,
                                         near_duplicate=0.5)
    assert list(zip(kept["id"], kept["sample_idx"])) == [("keep", 0), ("short", 0)]
    assert [(r["id"], r["reason"]) for r in removed] == [
        ("keep", "truncated"), ("easy", "pass_rate"), ("exact", "duplicate"), ("near", "near_duplicate"),
        ("leak", "contaminated")]
    assert "math500:" in removed[-1]["detail"] and "with keep" in removed[3]["detail"]
    stats = artifact.stats
    assert (stats["rows_in"], stats["problems_in"], stats["problems_kept"], stats["rows"]) == (7, 6, 2, 2)
    assert stats["removed_contaminated"] == 1 and stats["removed_near_duplicate"] == 1


def test_a_problem_with_no_pass_rate_is_dropped_as_ungraded_by_the_pass_rate_window(tmp_path):
    data = [{**row, "pass_rate": None} if row["id"] == "short" else row for row in rows()]
    artifact, kept, removed = run_filter(tmp_path, data, min_pass_rate=0.1, decontaminate=[])
    assert "short" not in kept["id"] and "keep" in kept["id"]
    assert [(r["id"], r["reason"]) for r in removed] == [("short", "ungraded"), ("exact", "duplicate")]
    assert (artifact.stats["removed_ungraded"], artifact.stats["removed_pass_rate"]) == (1, 0)
    _, kept_without_window, _ = run_filter(tmp_path / "no_window", data, decontaminate=[])
    assert "short" in kept_without_window["id"]  # only the pass-rate window looks at pass rates


def test_defaults_only_dedupe_and_decontaminate(tmp_path):
    _, kept, removed = run_filter(tmp_path, rows())
    assert {r["reason"] for r in removed} == {"duplicate", "contaminated"}
    assert "near" in kept["id"] and "easy" in kept["id"]
    _, kept_all, removed_none = run_filter(tmp_path / "off", rows(), dedupe_exact=False, decontaminate=[])
    assert len(kept_all) == 7 and removed_none == []


def test_pass_rate_window_needs_verify_output_and_a_sane_window(tmp_path):
    data = [{k: v for k, v in row.items() if k != "pass_rate"} for row in rows()]
    with pytest.raises(UserError, match=r"'graded'.*pass_rate"):
        run_filter(tmp_path, data, min_pass_rate=0.1)
    with pytest.raises(ValidationError, match="above"):
        filter_step.Config(uses="filter", input="graded", min_pass_rate=0.8, max_pass_rate=0.2)


def exact_near_duplicates(problems: dict[str, str], threshold: float, n: int = 5) -> set[str]:
    """The exact rule by brute force: each problem against every earlier kept one."""
    kept: dict[str, set] = {}
    dropped = set()
    for problem_id, text in problems.items():
        grams = filter_step.ngrams(text, n)
        if any(grams and len(grams & other) / len(grams | other) >= threshold for other in kept.values() if other):
            dropped.add(problem_id)
        else:
            kept[problem_id] = grams
    return dropped


def train_problems(count: int) -> dict[str, str]:
    with open("data/train/gsm8k_train.jsonl") as f:
        return {row["id"]: row["problem"] for row in map(json.loads, f.readlines()[:count])}


def test_lsh_finds_a_planted_near_duplicate_and_keeps_distinct_problems(tmp_path):
    problems = train_problems(200)
    first_id, first = next(iter(problems.items()))
    planted = first + " Give a whole number."  # 4 tokens more: Jaccard 0.88 with the first problem
    data = [{"id": problem_id, "problem": text} for problem_id, text in problems.items()]
    data.insert(100, {"id": "planted", "problem": planted})
    artifact, kept, removed = run_filter(tmp_path, data, near_duplicate=0.8, decontaminate=[])

    assert [(r["id"], r["reason"]) for r in removed] == [("planted", "near_duplicate")]
    assert removed[0]["detail"].endswith(f"with {first_id}")
    assert kept["id"] == list(problems)  # the 200 distinct problems, in input order
    assert artifact.stats["removed_near_duplicate"] == 1


def test_lsh_drops_what_the_exact_rule_drops(tmp_path):
    problems = train_problems(300)
    # near duplicates at several similarities: one word changed, a sentence added, a clause cut
    variants = {}
    for number, (problem_id, text) in enumerate(list(problems.items())[:60]):
        words = text.split()
        if number % 3 == 0:
            variants[f"{problem_id}-word"] = " ".join(words[:len(words) // 2] + ["seven"] + words[len(words) // 2 + 1:])
        elif number % 3 == 1:
            variants[f"{problem_id}-added"] = text + " Answer in whole numbers."
        else:
            variants[f"{problem_id}-cut"] = " ".join(words[len(words) // 5:])
    problems.update(variants)
    for threshold in (0.5, 0.8):
        expected = exact_near_duplicates(problems, threshold)
        data = [{"id": problem_id, "problem": text} for problem_id, text in problems.items()]
        _, _, removed = run_filter(tmp_path / str(threshold), data, near_duplicate=threshold, decontaminate=[])
        assert {r["id"] for r in removed if r["reason"] == "near_duplicate"} == expected
        assert len(expected) >= 25  # the variants are near duplicates at these thresholds, most of them


def test_keep_where_and_drop_where_remove_rows_by_a_published_mark(tmp_path):
    data = [{"id": "a", "problem": "p1", "source": "olympiads", "problem_is_valid": "Yes", "sample_idx": 0},
            {"id": "a", "problem": "p1", "source": "olympiads", "problem_is_valid": "Yes", "sample_idx": 1},
            {"id": "b", "problem": "p2", "source": "cn_k12", "problem_is_valid": "Yes", "sample_idx": 0},
            {"id": "c", "problem": "p3", "source": "amc_aime", "problem_is_valid": "No", "sample_idx": 0},
            # same text as b, which is gone: not a duplicate of anything kept
            {"id": "d", "problem": "p2", "source": "olympiads", "problem_is_valid": "Yes", "sample_idx": 0}]
    artifact, kept, removed = run_filter(tmp_path, data, keep_where={"problem_is_valid": ["Yes"]},
                                         drop_where={"source": ["cn_k12"]}, decontaminate=[])
    assert kept["id"] == ["a", "a", "d"]
    assert [(r["id"], r["reason"], r["detail"]) for r in removed] == [
        ("c", "keep_where", "row 3: problem_is_valid = 'No'"), ("b", "drop_where", "row 2: source = 'cn_k12'")]
    assert (artifact.stats["removed_keep_where"], artifact.stats["removed_drop_where"]) == (1, 1)
    assert artifact.stats["problems_kept"] == 2


def test_where_matches_the_value_and_its_type_and_names_a_missing_column(tmp_path):
    data = [{"id": "a", "problem": "p1", "flag": 1, "valid": True}, {"id": "b", "problem": "p2", "flag": 0,
                                                                     "valid": False}]
    _, kept, _ = run_filter(tmp_path / "1", data, drop_where={"flag": [True]}, decontaminate=[])
    assert kept["id"] == ["a", "b"]  # 1 is not True
    _, kept, _ = run_filter(tmp_path / "3", data, drop_where={"valid": [False]}, decontaminate=[])
    assert kept["id"] == ["a"]
    with pytest.raises(UserError, match="source"):
        run_filter(tmp_path / "2", data, drop_where={"source": ["cn_k12"]}, decontaminate=[])


def test_where_fields_at_their_default_leave_the_key_as_it_was():
    from pipeline.core.keys import keyed_config

    plain = filter_step.Config(uses="filter", input="graded")
    assert "keep_where" not in keyed_config(plain) and "drop_where" not in keyed_config(plain)
    set_ = filter_step.Config(uses="filter", input="graded", drop_where={"source": ["cn_k12"]})
    assert keyed_config(set_)["drop_where"] == {"source": ["cn_k12"]}


def test_a_dry_run_whose_row_rules_keep_nothing_writes_stand_ins_so_the_next_steps_run(tmp_path):
    data = [{"id": "a", "problem": "p1", "sample_idx": 0, "correct": False},
            {"id": "b", "problem": "p2", "sample_idx": 0, "correct": False}]
    artifact, kept, removed = run_filter(tmp_path, data, keep_where={"correct": [True]}, decontaminate=[],
                                         dry_run=True)
    assert kept["id"] == ["a", "b"] and removed == []
    assert artifact.stats["dry_run_stand_ins"] == 2
    # a real run keeps to the rule and writes nothing; a dry run that keeps a row keeps to the rule too
    artifact, kept, _ = run_filter(tmp_path / "real", data, keep_where={"correct": [True]}, decontaminate=[])
    assert len(kept) == 0 and "dry_run_stand_ins" not in artifact.stats
    data[1]["correct"] = True
    artifact, kept, _ = run_filter(tmp_path / "kept", data, keep_where={"correct": [True]}, decontaminate=[],
                                   dry_run=True)
    assert kept["id"] == ["b"] and "dry_run_stand_ins" not in artifact.stats
