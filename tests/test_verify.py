"""The verify step on a hand-made samples dataset: labels, pass rates, stats, errors, resume."""

import json

import datasets
import pytest

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.steps import verify

SAMPLES = [  # id, answer, completion, finish_reason, expected label
    ("p1", "12", "3 * 4 = 12, so \\boxed{12}", "stop", "correct"),
    ("p1", "12", "\\boxed{13}", "stop", "incorrect"),
    ("p1", "12", "3 times 4 is twelve... let me think about", "length", "truncated"),
    ("p1", "12", "I cannot tell.", "stop", "no_answer"),
    ("p2", "\\frac{1}{2}", "\\boxed{0.5}", "stop", "correct"),
    ("p2", "\\frac{1}{2}", "<think>hmm</think> \\boxed{\\frac{1}{2}}", "stop", "correct"),
    ("p3", "", "\\boxed{1}", "stop", "bad_gold"),
]


def write_samples(tmp_path, rows, drop=()):
    columns = {"id": [r[0] for r in rows], "answer": [r[1] for r in rows], "completion": [r[2] for r in rows],
               "finish_reason": [r[3] for r in rows], "sample_idx": list(range(len(rows)))}
    for column in drop:
        del columns[column]
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "samples" / "data"))
    return {"samples": Artifact("samples", "dataset", tmp_path / "samples")}


def run_verify(tmp_path, inputs, **settings):
    cfg = verify.Config(uses="verify", input="samples", timeout_s=30, **settings)
    out = Output(name="graded", kind="dataset", dir=tmp_path / "graded", scratch=tmp_path / "scratch", seed=0)
    artifact = verify.run(cfg, inputs, out)
    return artifact, datasets.load_from_disk(str(tmp_path / "graded" / "data"))


def test_labels_pass_rates_and_stats(tmp_path):
    artifact, graded = run_verify(tmp_path, write_samples(tmp_path, SAMPLES))
    assert graded["label"] == [s[4] for s in SAMPLES]
    assert graded["correct"] == [s[4] == "correct" for s in SAMPLES]
    assert graded["extracted"][:2] == ["12", "13"]
    # p3's only sample is ungraded (bad_gold): no pass rate, rather than 0
    assert graded["pass_rate"] == [0.25] * 4 + [1.0] * 2 + [None]
    assert graded["graded_samples"] == [4] * 4 + [2] * 2 + [0]
    assert graded["grade_error"] == [""] * 7
    assert graded["sample_idx"] == list(range(len(SAMPLES)))  # input columns pass through
    stats = artifact.stats
    assert (stats["rows"], stats["problems"], stats["problems_graded"], stats["problems_solved"]) == (7, 3, 2, 2)
    assert stats["mean_pass_rate"] == pytest.approx((0.25 + 1.0) / 2)
    labels = ("label_correct", "label_truncated", "label_bad_gold", "label_timeout", "label_error")
    assert [stats[label] for label in labels] == [3, 1, 1, 0, 0]
    assert (stats["problems_ungraded_bad_gold"], stats["problems_ungraded_timeout"]) == (1, 0)


def test_a_row_whose_grading_raises_is_kept_as_an_error_and_leaves_the_pass_rate(tmp_path, monkeypatch):
    import eval.grading_pool

    # A dataset's string column cannot hold a value that makes grading raise, so the pool is handed one: a
    # completion that is not text makes `grade` raise TypeError in the worker, for that row only.
    real_iter_grades = eval.grading_pool.iter_grades

    def iter_grades(completions, *args, **kwargs):
        return real_iter_grades([123 if c == "RAISE" else c for c in completions], *args, **kwargs)

    monkeypatch.setattr(eval.grading_pool, "iter_grades", iter_grades)
    rows = [
        ("p1", "12", "\\boxed{12}", "stop", "correct"),
        ("p1", "12", "RAISE", "stop", "error"),
        ("p1", "12", "\\boxed{13}", "stop", "incorrect"),
        ("p2", "", "\\boxed{1}", "stop", "bad_gold"),
        ("p2", "", "\\boxed{2}", "stop", "bad_gold"),
        ("p3", "5", "\\boxed{10^{10^{10^{10}}}}", "stop", "timeout"),  # too costly to grade: timeout at once
        ("p4", "5", "RAISE", "stop", "error"),
    ]
    inputs = write_samples(tmp_path, rows)
    artifact, graded = run_verify(tmp_path, inputs)
    assert graded["label"] == [r[4] for r in rows]
    assert [bool(e) for e in graded["grade_error"]] == [r[4] == "error" for r in rows]
    assert graded["grade_error"][1].startswith("TypeError")
    # p1: 1 correct of 2 graded; p2-p4 have no graded sample
    assert graded["pass_rate"] == [0.5] * 3 + [None] * 4
    assert graded["graded_samples"] == [2] * 3 + [0] * 4
    stats = artifact.stats
    assert (stats["problems"], stats["problems_graded"], stats["mean_pass_rate"]) == (4, 1, 0.5)
    assert [stats[f"problems_ungraded_{label}"] for label in ("bad_gold", "timeout", "error")] == [1, 1, 1]
    assert (stats["label_error"], stats["label_timeout"], stats["label_bad_gold"]) == (2, 1, 2)
    assert [(e["row"], e["id"]) for e in stats["grade_errors"]] == [(1, "p1"), (6, "p4")]
    assert all(e["error"].startswith("TypeError") for e in stats["grade_errors"])
    assert sum(stats["pass_rate_histogram"].values()) == 1
    # the scratch file keeps the error text, so a resumed run has it too
    _, resumed = run_verify(tmp_path, inputs)
    assert resumed["grade_error"] == graded["grade_error"]


def test_no_graded_problem_at_all_still_writes_a_float_pass_rate_column(tmp_path):
    artifact, graded = run_verify(tmp_path, write_samples(tmp_path, [SAMPLES[-1]]))
    assert graded["pass_rate"] == [None] and graded.features["pass_rate"].dtype == "float64"
    assert artifact.stats["mean_pass_rate"] is None and artifact.stats["problems_ungraded_bad_gold"] == 1


def test_without_finish_reason_a_cut_off_answer_is_graded_as_text(tmp_path):
    rows = SAMPLES[:2] + [("p1", "12", "3 * 4 = 12. So the answer is 12.", "length", "truncated")]
    _, with_reason = run_verify(tmp_path / "with", write_samples(tmp_path / "with", rows))
    assert with_reason["label"] == ["correct", "incorrect", "truncated"]
    _, graded = run_verify(tmp_path, write_samples(tmp_path, rows, drop=["finish_reason"]))
    assert graded["label"] == ["correct", "incorrect", "correct"]  # a number from the cut-off text counts


def test_missing_column_names_the_dataset_and_column(tmp_path):
    inputs = write_samples(tmp_path, SAMPLES, drop=["completion"])
    with pytest.raises(UserError, match=r"'samples' lacks column\(s\) completion "):
        run_verify(tmp_path, inputs)


def test_resume_keeps_grades_already_written(tmp_path):
    inputs = write_samples(tmp_path, SAMPLES[:2])
    (tmp_path / "scratch").mkdir()
    # a killed run graded row 1 (recorded here with a marker label and error) and was cut off mid-line
    (tmp_path / "scratch" / verify.PROGRESS_FILE).write_text(
        json.dumps([1, "error", False, "", "ValueError: marker"]) + "\n[0, \"corr")
    _, graded = run_verify(tmp_path, inputs)
    assert graded["label"] == ["correct", "error"]  # row 0 graded now, row 1 taken from the earlier run
    assert graded["grade_error"] == ["", "ValueError: marker"]


def test_think_prefix_means_unclosed_thinking_only_scores_a_box(tmp_path):
    rows = [("p1", "12", "so it is 12", "stop", ""), ("p1", "12", "so \\boxed{12}", "stop", ""),
            ("p1", "12", "ok</think>It is 12.", "stop", "")]
    _, graded = run_verify(tmp_path, write_samples(tmp_path, rows), think_prefix="<think>\n")
    assert graded["label"] == ["no_answer", "correct", "correct"]
    assert graded["completion"][0] == "so it is 12"  # the stored completion is left as sampled


def test_manifest_lists_bad_golds_histogram_and_audit_disagreements(tmp_path):
    rows = SAMPLES + [("p4", "7", "the sum is 7, or \\boxed{7} in words", "stop", "")]
    artifact, _ = run_verify(tmp_path, write_samples(tmp_path, rows), audit=True)
    stats = artifact.stats
    assert stats["bad_gold_ids"] == ["p3"]
    assert stats["pass_rate_histogram"]["0.0-0.1"] == 0 and stats["pass_rate_histogram"]["0.9-1.0"] == 2
    assert sum(stats["pass_rate_histogram"].values()) == stats["problems_graded"] == 3  # p3 has no pass rate
    # both graders agree on every row here (the truncated row's last number, 3, is wrong either way)
    audit = [json.loads(line) for line in (tmp_path / "graded" / verify.AUDIT_FILE).read_text().splitlines()]
    assert stats["audit_disagreements"] == len(audit) == 0


def test_audit_writes_where_the_two_graders_disagree(tmp_path):
    # math-verify simplifies 2+0 to 2; the audit compares "2+0" and "2" as text
    rows = [("p1", "2", "\\boxed{2+0}", "stop", ""), ("p1", "2", "\\boxed{2}", "stop", "")]
    artifact, graded = run_verify(tmp_path, write_samples(tmp_path, rows), audit=True)
    assert graded["label"] == ["correct", "correct"]
    audit = [json.loads(line) for line in (tmp_path / "graded" / verify.AUDIT_FILE).read_text().splitlines()]
    assert [(a["row"], a["id"], a["audit_correct"]) for a in audit] == [(0, "p1", False)]
    assert artifact.stats["audit_disagreements"] == 1


def test_think_prefix_column_from_the_sample_step_is_used(tmp_path):
    inputs = write_samples(tmp_path, [("p1", "12", "so it is 12", "stop", "")])
    ds = datasets.load_from_disk(str(tmp_path / "samples" / "data")).add_column("think_prefix", ["<think>\n"])
    ds.save_to_disk(str(tmp_path / "samples2" / "data"))
    inputs = {"samples": Artifact("samples", "dataset", tmp_path / "samples2")}
    _, graded = run_verify(tmp_path, inputs)
    assert graded["label"] == ["no_answer"]  # thinking never closed and no box


def test_regrade_recipe_grades_a_completions_file_without_a_model(tmp_path):
    """recipes/regrade.yaml: load -> verify on completions from elsewhere; nothing builds or loads a model."""
    import os
    import subprocess
    import sys

    model_cache = tmp_path / "model_cache"
    model_cache.mkdir()
    env = {**os.environ, "DISTILL_CACHE": str(model_cache), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "pipeline.commands.cli", "run", "recipes/regrade.yaml", "-o",
                    f"workdir={tmp_path / 'run'}"], env=env, check=True, capture_output=True)
    graded = datasets.load_from_disk(str(tmp_path / "run" / "graded" / "data"))
    assert graded["label"] == ["correct", "incorrect", "correct", "truncated", "correct", "no_answer"]
    assert graded["pass_rate"] == [0.5] * 6
    assert not any(model_cache.iterdir())
