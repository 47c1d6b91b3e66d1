"""The pairs step: graded samples -> REDI preference pairs (TRL conversational preference format)."""

import pytest
from pydantic import ValidationError

from pipeline.core.errors import UserError
from pipeline.steps import pairs
from tests.step_runner import run_on_rows


def row(problem_id, sample_idx, label, completion=None):
    return {"id": problem_id, "prompt": [{"role": "user", "content": f"problem {problem_id}"}],
            "sample_idx": sample_idx, "label": label, "correct": label == "correct",
            "completion": completion or f"{label} {sample_idx} of {problem_id}"}


def run_pairs(tmp_path, rows, **config):
    return run_on_rows(pairs, tmp_path, rows, uses="pairs", **config)


ROWS = [
    # a: out of order; first correct is 1, first incorrect is 2 (0 is truncated, not a wrong answer by default)
    row("a", 3, "correct"), row("a", 2, "incorrect"), row("a", 0, "truncated"), row("a", 1, "correct"),
    row("a", 4, "incorrect"),
    row("b", 0, "correct"), row("b", 1, "correct"),  # no rejected sample: no pair
    row("c", 0, "incorrect"), row("c", 1, "no_answer"),  # no correct sample: no pair
    row("d", 0, "bad_gold"), row("d", 1, "correct"),  # bad_gold never rejected
]


def test_first_correct_against_first_incorrect(tmp_path):
    artifact, data = run_pairs(tmp_path, ROWS)
    assert data.column_names == ["id", "prompt", "chosen", "rejected"]
    assert data["id"] == ["a"]
    assert data[0]["prompt"] == [{"role": "user", "content": "problem a"}]
    assert data[0]["chosen"] == [{"role": "assistant", "content": "correct 1 of a"}]
    assert data[0]["rejected"] == [{"role": "assistant", "content": "incorrect 2 of a"}]
    stats = artifact.stats
    assert (stats["problems_in"], stats["problems_paired"], stats["problems_without_rejected"]) == (4, 1, 2)


def test_k_pairs_and_wider_rejected_labels(tmp_path):
    _, data = run_pairs(tmp_path, ROWS, max_pairs_per_problem=3, rejected_labels=["incorrect", "truncated"])
    a_pairs = [(c[0]["content"], r[0]["content"]) for i, c, r in zip(data["id"], data["chosen"], data["rejected"])
               if i == "a"]
    assert a_pairs == [("correct 1 of a", "truncated 0 of a"), ("correct 3 of a", "incorrect 2 of a")]
    with pytest.raises(ValidationError, match="rejected_labels"):
        pairs.Config(uses="pairs", input="graded", rejected_labels=["bad_gold"])


def test_an_ungraded_sample_is_never_a_rejected_answer(tmp_path):
    # timeout and error say nothing about the answer, whichever labels are asked for
    rows = [row("e", 0, "timeout"), row("e", 1, "error"), row("e", 2, "correct"), row("e", 3, "no_answer")]
    _, data = run_pairs(tmp_path, rows, rejected_labels=["incorrect", "no_answer", "truncated"])
    assert data[0]["rejected"] == [{"role": "assistant", "content": "no_answer 3 of e"}]
    for label in ("timeout", "error"):
        with pytest.raises(ValidationError, match="rejected_labels"):
            pairs.Config(uses="pairs", input="graded", rejected_labels=["incorrect", label])


def test_length_limits_in_characters_and_student_tokens(tmp_path):
    rows = [row("a", 0, "correct", "x" * 500), row("a", 1, "correct"), row("a", 2, "incorrect")]
    _, by_chars = run_pairs(tmp_path / "chars", rows, max_chars=100)
    assert by_chars[0]["chosen"][0]["content"] == "correct 1 of a"
    artifact, by_tokens = run_pairs(tmp_path / "tokens", rows, max_tokens=3, tokenizer="builtin:tiny-random")
    assert len(by_tokens) == 0 and artifact.stats["samples_too_long"] == 3
    with pytest.raises(ValidationError, match="tokenizer"):
        pairs.Config(uses="pairs", input="graded", max_tokens=10)


def test_think_prefix_starts_both_responses(tmp_path):
    rows = [{**r, "think_prefix": "<think>\n"} for r in ROWS[:2]]
    _, data = run_pairs(tmp_path, rows)
    assert data[0]["chosen"][0]["content"] == "<think>\ncorrect 3 of a"
    assert data[0]["rejected"][0]["content"] == "<think>\nincorrect 2 of a"


def test_missing_label_column_is_named(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "label"} for r in ROWS]
    with pytest.raises(UserError, match=r"'graded'.*label"):
        run_pairs(tmp_path, rows)


def test_a_dry_run_with_no_pair_writes_each_problems_first_two_samples_as_stand_ins(tmp_path):
    rows = [row("c", 1, "no_answer"), row("c", 0, "incorrect"), row("e", 0, "incorrect")]  # e has one sample
    artifact, data = run_pairs(tmp_path, rows, dry_run=True)
    assert data["id"] == ["c"]
    assert data[0]["chosen"] == [{"role": "assistant", "content": "incorrect 0 of c"}]
    assert data[0]["rejected"] == [{"role": "assistant", "content": "no_answer 1 of c"}]
    assert artifact.stats["dry_run_stand_ins"] == 1
    _, real_run = run_pairs(tmp_path / "real", rows)
    assert len(real_run) == 0  # never outside a dry run
    # a dry run that finds a real pair keeps to it
    _, data = run_pairs(tmp_path / "found", ROWS, dry_run=True)
    assert data["id"] == ["a"]


def test_how_the_chosen_trace_was_sampled_is_carried_into_the_pairs(tmp_path):
    rows = [{**r, "think_prefix": "", "prompt_text": f"text of {r['id']}", "model": "m"} for r in ROWS]
    _, data = run_pairs(tmp_path, rows)
    assert data.column_names == ["id", "prompt", "chosen", "rejected", "think_prefix", "prompt_text", "sampled_by"]
    assert (data[0]["prompt_text"], data[0]["sampled_by"]) == ("text of a", "m")
