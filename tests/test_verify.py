"""The verify step on a hand-made samples dataset: labels, pass rates, stats, errors, resume."""

import json

import datasets
import pytest

from pipeline.artifacts import Artifact, Output
from pipeline.errors import UserError
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
    assert graded["pass_rate"] == [0.25] * 4 + [1.0] * 2 + [0.0]
    assert graded["sample_idx"] == list(range(len(SAMPLES)))  # input columns pass through
    stats = artifact.stats
    assert (stats["rows"], stats["problems"], stats["problems_solved"]) == (7, 3, 2)
    assert stats["mean_pass_rate"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    labels = ("label_correct", "label_truncated", "label_bad_gold", "label_timeout")
    assert [stats[label] for label in labels] == [3, 1, 1, 0]


def test_without_finish_reason_a_cut_off_answer_is_graded_as_text(tmp_path):
    _, graded = run_verify(tmp_path, write_samples(tmp_path, SAMPLES[:3], drop=["finish_reason"]))
    assert graded["label"] == ["correct", "incorrect", "incorrect"]  # a number from the cut-off text counts


def test_missing_column_names_the_dataset_and_column(tmp_path):
    inputs = write_samples(tmp_path, SAMPLES, drop=["completion"])
    with pytest.raises(UserError, match=r"'samples' lacks column\(s\) completion "):
        run_verify(tmp_path, inputs)


def test_resume_keeps_grades_already_written(tmp_path):
    inputs = write_samples(tmp_path, SAMPLES[:2])
    (tmp_path / "scratch").mkdir()
    # a killed run graded row 1 (recorded here with a marker label) and was cut off mid-line
    (tmp_path / "scratch" / verify.PROGRESS_FILE).write_text(json.dumps([1, "timeout", False, "x"]) + "\n[0, \"corr")
    _, graded = run_verify(tmp_path, inputs)
    assert graded["label"] == ["correct", "timeout"]  # row 0 graded now, row 1 taken from the earlier run


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
    assert stats["pass_rate_histogram"]["0.0-0.1"] == 1 and stats["pass_rate_histogram"]["0.9-1.0"] == 2
    assert sum(stats["pass_rate_histogram"].values()) == stats["problems"] == 4
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
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "recipes/regrade.yaml", "-o",
                    f"workdir={tmp_path / 'run'}"], env=env, check=True, capture_output=True)
    graded = datasets.load_from_disk(str(tmp_path / "run" / "graded" / "data"))
    assert graded["label"] == ["correct", "incorrect", "correct", "truncated", "correct", "no_answer"]
    assert graded["pass_rate"] == [0.5] * 6
    assert not any(model_cache.iterdir())
