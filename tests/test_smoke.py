"""recipes/smoke.yaml end to end through the real CLI: every step type, real vLLM, TRL, peft, math-verify."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

DISTILL = str(Path(sys.executable).with_name("distill"))


def distill(*args, output=None):
    proc = subprocess.run([DISTILL, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    if output is not None:
        output.update(stdout=proc.stdout, stderr=proc.stderr)
    return proc.stdout


FIRST_RUN = {}  # the first smoke run's stdout and stderr, as a user without a terminal (CI, nohup) sees them


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
    """recipes/smoke.yaml run once (about 4 minutes on 2 CPU cores), for every test that reads what it wrote."""
    workdir = tmp_path_factory.mktemp("smoke-run") / "smoke"
    distill("run", "recipes/smoke.yaml", "-o", f"workdir={workdir}", output=FIRST_RUN)
    return workdir


def test_smoke_run_without_a_terminal_prints_one_line_per_step_and_logs_the_rest(smoke_workdir):
    out, err = FIRST_RUN["stdout"], FIRST_RUN["stderr"]
    for library_noise in ("it/s", "%|", "Map", "Saving the dataset", "Loading weights", "Processed prompts",
                          "Warning", "WARNING", "\x1b", "\r"):
        assert library_noise not in out + err, library_noise
    steps = ["problems", "samples", "graded", "sft_data", "pairs", "sft", "merged", "redi", "redi_merged", "report"]
    done = [line for line in out.splitlines() if line.startswith("✓")]
    assert len(done) == len(steps) and all(f"] {step} (" in line for step, line in zip(steps, done))
    assert f"run page → {smoke_workdir / 'run-report' / 'index.html'}" in out
    logs = {step: (smoke_workdir / step / "log.txt").read_text() for step in steps}
    assert all(logs[step].startswith(f"[{i}/10] {step} (") for i, step in enumerate(steps, 1))
    assert "Loading safetensors checkpoint shards" in logs["samples"]  # vLLM's engine process, hidden from the console


def test_smoke_recipe_end_to_end_then_cached(smoke_workdir):
    workdir = smoke_workdir
    manifests = {p.parent.name: json.loads(p.read_text()) for p in workdir.glob("*/manifest.json")}
    assert set(manifests) == {"problems", "samples", "graded", "sft_data", "pairs", "sft", "merged", "redi",
                              "redi_merged", "report"}
    assert all(m["status"] == "complete" for m in manifests.values())

    samples = datasets.load_from_disk(str(workdir / "samples" / "data"))
    assert len(samples) == 24 * 4
    graded = datasets.load_from_disk(str(workdir / "graded" / "data"))
    assert {"label", "correct", "extracted", "pass_rate"} <= set(graded.column_names)
    sft_data = datasets.load_from_disk(str(workdir / "sft_data" / "data"))
    assert len(sft_data) == len({row["id"] for row in graded if row["correct"]}) > 0
    pairs = datasets.load_from_disk(str(workdir / "pairs" / "data"))
    assert len(pairs) > 0 and {"prompt", "chosen", "rejected"} <= set(pairs.column_names)
    assert manifests["redi"]["parents"] == {"pairs": manifests["pairs"]["key"], "sft": manifests["sft"]["key"]}
    for merged in ("merged", "redi_merged"):
        assert (workdir / merged / "model" / "config.json").exists()
    results = json.loads((workdir / "report" / "results.json").read_text())
    assert list(results["models"]) == ["builtin:tiny-random", "step:merged", "step:redi_merged"]
    for per_benchmark in results["models"].values():
        assert 0.0 <= per_benchmark["arith_test"]["pass@1"] <= 1.0

    started = time.time()
    out = distill("run", "recipes/smoke.yaml", "-o", f"workdir={workdir}")
    print(f"cached re-run: {time.time() - started:.2f}s")
    assert "10 skipped" in out and "0 step(s) ran" in out
    status = distill("status", str(workdir))
    assert status.count("complete") == 10


def test_run_report_of_the_smoke_run(smoke_workdir, tmp_path):
    """The page of a real run, in headless Chromium: its funnel says what the manifests say, and the sample browser
    opened at #browser=graded&label=correct shows correct samples only."""
    from tests.test_run_report import Elements, chromium, funnel_rows, open_page, samples_shown

    chromium()
    workdir = smoke_workdir
    out = distill("report", str(workdir))
    page = workdir / "run-report" / "index.html"
    assert f"report → {page}" in out
    manifests = {p.parent.name: json.loads(p.read_text()) for p in workdir.glob("*/manifest.json")}
    for trainer in ("sft", "redi"):  # the trainer's log, kept for the curves; it ends with the run's summary
        history = json.loads((workdir / trainer / "log_history.json").read_text())
        assert "train_loss" in history[-1] and history[-1]["step"] == manifests[trainer]["stats"]["steps"]

    screenshot = tmp_path / "run-report.png"
    elements = Elements(open_page(page, tmp_path / "profile", screenshot=screenshot))
    print(f"screenshot: {screenshot}")
    assert {e["data-step"]: e["data-state"] for e in elements.where(tag="g") if "data-step" in e} == {
        name: "complete" for name in manifests}
    funnel = funnel_rows(elements)
    assert list(funnel) == ["problems", "samples", "graded", "sft_data", "pairs", "sft", "redi"]
    for step, shown in funnel.items():
        stats = manifests[step]["stats"]
        assert shown["rows"] == stats["rows"], step
        for stat, count in shown["counts"].items():
            expected = stats["problems_in"] - stats["problems_kept"] if stat == "problems_in - problems_kept" else \
                stats.get(stat, 0)
            assert count == expected, (step, stat)
    graded = manifests["graded"]["stats"]
    assert {stat: funnel["graded"]["counts"][stat] for stat in ("label_correct", "label_incorrect")} == {
        "label_correct": graded["label_correct"], "label_incorrect": graded["label_incorrect"]}
    assert funnel["sft_data"]["problems"] == str(manifests["sft_data"]["stats"]["problems_kept"])
    assert funnel["pairs"]["problems"] == str(manifests["pairs"]["stats"]["problems_paired"])
    assert elements.where(tag="section", class_="evaluation", data_step="report")

    elements = Elements(open_page(page, tmp_path / "profile", "browser=graded&label=correct"))
    shown = samples_shown(elements)
    assert 0 < len(shown) == min(20, graded["label_correct"])
    assert {s["data-label"] for s in shown} == {"correct"}
    assert elements.where(id="browser-status")[0]["data-matching"] == str(graded["label_correct"])


@pytest.mark.slow  # three smoke runs, ~7 min: `pytest -m slow tests/test_smoke.py`
def test_smoke_recipe_over_three_seeds_then_compared(tmp_path):
    workdir = tmp_path / "smoke"
    out = distill("run", "recipes/smoke.yaml", "-o", f"workdir={workdir}", "--seeds", "0,1,2")
    assert out.count("same key") == 2  # seeds 1 and 2 copy `problems` (load draws no random numbers)
    per_seed = [json.loads((workdir / f"seed-{seed}" / "report" / "results.json").read_text()) for seed in range(3)]
    assert [r["meta"]["seed"] for r in per_seed] == [0, 1, 2]
    comparison = json.loads((workdir / "compare.json").read_text())["evaluations"]["report"]
    assert comparison["runs"] == ["seed 0", "seed 1", "seed 2"]
    for model in ("builtin:tiny-random", "step:merged", "step:redi_merged"):
        rates = [r["models"][model]["arith_test"]["pass@1"] for r in per_seed]
        assert comparison["scores"][model]["arith_test"]["mean"] == sum(rates) / 3
    differences = comparison["differences"]["step:merged"]["arith_test"]["runs"]
    assert list(differences.values()) == [r["comparisons"]["arith_test"]["step:merged"]["difference"] for r in per_seed]
    again = distill("compare", str(workdir))
    assert "report: pass@1 (%) across 3 run(s)" in again and "minus builtin:tiny-random" in again
