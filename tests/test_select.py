"""The select step: graded samples -> one verified trace per problem, in TRL conversational format."""

import pytest
from pydantic import ValidationError

from pipeline.core.errors import UserError
from pipeline.steps import select
from tests.step_runner import run_on_rows


def prompt(problem):
    return [{"role": "user", "content": f"{problem} Please reason step by step."}]


def graded_row(problem_id, sample_idx, correct, problem="What is 2 + 3?"):
    return {
        "id": problem_id,
        "problem": problem,
        "answer": "5",
        "sample_idx": sample_idx,
        "prompt": prompt(problem),
        "completion": f"completion {sample_idx} of {problem_id}",
        "correct": correct,
        "label": "correct" if correct else "incorrect",
    }


def run_select(tmp_path, rows, **config):
    return run_on_rows(select, tmp_path, rows, uses="select", **config)


def test_keeps_the_correct_sample_with_the_lowest_sample_idx(tmp_path):
    rows = [
        # sample_idx out of order: sample 3 comes first but sample 1 is the first correct one
        graded_row("a", 3, True), graded_row("a", 0, False), graded_row("a", 1, True), graded_row("a", 2, True),
        graded_row("b", 0, False, problem="What is 4 * 4?"), graded_row("b", 1, False, problem="What is 4 * 4?"),
        graded_row("c", 1, False, problem="What is 9 - 1?"), graded_row("c", 0, True, problem="What is 9 - 1?"),
    ]
    artifact, selected = run_select(tmp_path, rows)

    assert selected.column_names == ["id", "messages"]
    assert selected["id"] == ["a", "c"]  # b has no correct sample; input order kept
    assert selected[0]["messages"] == prompt("What is 2 + 3?") + [
        {"role": "assistant", "content": "completion 1 of a"}
    ]
    assert selected[1]["messages"][-1] == {"role": "assistant", "content": "completion 0 of c"}
    assert artifact.stats == {"samples_in": 8, "problems_in": 3, "problems_kept": 2, "rows": 2}


def test_no_correct_sample_gives_an_empty_dataset_with_the_schema(tmp_path):
    artifact, selected = run_select(tmp_path, [graded_row("a", 0, False), graded_row("a", 1, False)])
    assert len(selected) == 0
    assert selected.column_names == ["id", "messages"]
    assert artifact.stats["problems_kept"] == 0


def test_missing_column_names_dataset_and_column(tmp_path):
    rows = [{k: v for k, v in graded_row("a", 0, True).items() if k != "correct"}]
    with pytest.raises(UserError, match=r"'graded'.*correct"):
        run_select(tmp_path, rows)


def test_unknown_policy_is_refused():
    with pytest.raises(ValidationError):
        select.Config(uses="select", input="graded", keep="longest")


def test_all_correct_and_shortest_k(tmp_path):
    rows = [graded_row("a", i, correct) for i, correct in enumerate([True, False, True, True])]
    for row, tokens in zip(rows, [30, 5, 10, 20]):
        row["completion_tokens"] = tokens
    _, everything = run_select(tmp_path / "all", rows, keep="all_correct")
    assert [m[-1]["content"] for m in everything["messages"]] == [f"completion {i} of a" for i in (0, 2, 3)]
    _, shortest = run_select(tmp_path / "short", rows, keep="shortest_k", k=2)
    assert [m[-1]["content"] for m in shortest["messages"]] == ["completion 2 of a", "completion 3 of a"]
    with pytest.raises(ValidationError, match="needs k"):
        select.Config(uses="select", input="graded", keep="shortest_k")


def test_max_tokens_counts_the_students_tokens_and_think_prefix_is_kept(tmp_path):
    from transformers import AutoTokenizer

    from pipeline.core.models import resolve_model

    rows = [graded_row("a", 0, True), graded_row("a", 1, True)]
    rows[0]["completion"] = "word " * 50  # far over the limit
    for row in rows:
        row["think_prefix"] = "<think>\n"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-random"))
    limit = len(tokenizer("<think>\ncompletion 1 of a", add_special_tokens=False).input_ids)
    artifact, selected = run_select(tmp_path, rows, max_tokens=limit, tokenizer="builtin:tiny-random")
    assert selected["messages"][0][-1]["content"] == "<think>\ncompletion 1 of a"
    assert artifact.stats["dropped_too_long"] == 1
    _, none_fit = run_select(tmp_path / "tight", rows, max_tokens=limit - 1, tokenizer="builtin:tiny-random")
    assert len(none_fit) == 0
    with pytest.raises(ValidationError, match="tokenizer"):
        select.Config(uses="select", input="graded", max_tokens=10)


def test_a_dry_run_with_no_correct_sample_writes_stand_ins_so_training_still_runs(tmp_path):
    rows = [graded_row("a", 1, False), graded_row("a", 0, False), graded_row("b", 0, False, problem="What is 4 * 4?")]
    artifact, selected = run_on_rows(select, tmp_path, rows, uses="select", dry_run=True)
    assert selected["id"] == ["a", "b"]
    assert selected["messages"][0][-1]["content"] == "completion 0 of a"  # each problem's first sample
    assert artifact.stats["dry_run_stand_ins"] == 2
    # a dry run with a correct sample keeps to the policy
    rows.append(graded_row("b", 1, True, problem="What is 4 * 4?"))
    artifact, selected = run_on_rows(select, tmp_path / "again", rows, uses="select", dry_run=True)
    assert selected["id"] == ["b"] and "dry_run_stand_ins" not in artifact.stats


def test_how_each_trace_was_sampled_is_carried_into_the_training_data(tmp_path):
    rows = [{**graded_row("a", 0, True), "think_prefix": "<think>\n", "prompt_text": "<|user|>a<|assistant|><think>\n",
             "model": "builtin:smollm2-135m-instruct"},
            {**graded_row("b", 0, False, problem="What is 4 * 4?"), "think_prefix": "<think>\n", "prompt_text": "b",
             "model": "builtin:smollm2-135m-instruct"}]
    _, selected = run_select(tmp_path, rows)
    assert selected.column_names == ["id", "messages", "think_prefix", "prompt_text", "sampled_by"]
    assert selected[0]["messages"][-1]["content"] == "<think>\ncompletion 0 of a"
    assert (selected[0]["prompt_text"], selected[0]["sampled_by"]) == ("<|user|>a<|assistant|><think>\n",
                                                                       "builtin:smollm2-135m-instruct")
