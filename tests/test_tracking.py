"""Experiment tracking: `report_to` on training steps and on `evaluate`, offline with TensorBoard and Trackio,
through the real CLI; what they logged read back the way each stores it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.core.errors import UserError
from pipeline.steps import evaluate, sft
from pipeline.training.tracking import check_trackers_installed
from tests.test_console import conversations

DISTILL = str(Path(sys.executable).with_name("distill"))

RECIPE = """\
name: tracked
seed: 0
workdir: {workdir}
steps:
  conversations: {{uses: load, path: {conversations}, require: [id]}}
  sft: {{uses: sft, input: conversations, model: builtin:tiny-random, lora: null, max_steps: 3, logging_steps: 1,
        batch_size: 2, max_length: 128, report_to: [tensorboard, trackio]}}
  report: {{uses: evaluate, models: [builtin:tiny-random, "step:sft"], benchmarks: ["arith_test:2"], n: 1,
           max_tokens: 8, report_to: [tensorboard, trackio]}}
"""


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """The recipe run once (about a minute): its workdir and the Trackio dir it logged to."""
    root = tmp_path_factory.mktemp("tracked")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(workdir=root / "runs", conversations=conversations(root / "conversations.jsonl")))
    env = {**os.environ, "TRACKIO_DIR": str(root / "trackio")}
    done = subprocess.run([DISTILL, "run", str(recipe)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "runs", root / "trackio"


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def trackio_runs(trackio_dir: Path, project: str) -> dict[str, dict]:
    """Each run's logs and config, read through Trackio's own storage API (in a process of its own: Trackio reads
    TRACKIO_DIR once, when it is imported)."""
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; p = sys.argv[1]; "
            "print(json.dumps({r: {'logs': S.get_logs(p, r), 'config': S.get_run_config(p, r)} "
            "for r in S.get_runs(p)}, default=str))")
    done = subprocess.run([sys.executable, "-c", code, project], capture_output=True, text=True, check=True,
                          env={**os.environ, "TRACKIO_DIR": str(trackio_dir)})
    return json.loads(done.stdout)


def test_training_loss_goes_to_tensorboard_and_trackio(tracked_run):
    workdir, trackio_dir = tracked_run
    losses = [(entry["step"], entry["loss"]) for entry in json.loads((workdir / "sft" / "log_history.json").read_text())
              if "loss" in entry]
    assert [step for step, _ in losses] == [1, 2, 3]

    logged = tensorboard_scalars(workdir / "sft" / "runs")["train/loss"]
    assert [step for step, _ in logged] == [1, 2, 3]
    assert [value for _, value in logged] == pytest.approx([loss for _, loss in losses], rel=1e-6)

    run = trackio_runs(trackio_dir, "tracked")["tracked/sft"]
    assert [entry["train/loss"] for entry in run["logs"] if "train/loss" in entry] == pytest.approx(
        [loss for _, loss in losses], rel=1e-6)
    assert run["config"]["run_name"] == "tracked/sft" and run["config"]["max_steps"] == 3


def test_evaluation_results_go_to_tensorboard_and_trackio_with_the_config(tracked_run):
    workdir, trackio_dir = tracked_run
    results = json.loads((workdir / "report" / "results.json").read_text())
    expected = {f"arith_test:2/pass@1/{model}": results["models"][model]["arith_test:2"]["pass@1"]
                for model in ("builtin:tiny-random", "step:sft")}
    difference = results["comparisons"]["arith_test:2"]["step:sft"]["difference"]
    expected["arith_test:2/minus_builtin:tiny-random/step:sft"] = difference

    scalars = tensorboard_scalars(workdir / "report" / "runs")
    assert {tag: scalars[tag] for tag in expected} == {tag: [(0, pytest.approx(v))] for tag, v in expected.items()}
    assert "arith_test:2/pass@1_stderr/step:sft" in scalars

    run = trackio_runs(trackio_dir, "tracked")["tracked/report"]
    assert {key: run["logs"][0][key] for key in expected} == pytest.approx(expected)
    assert run["config"]["models"] == ["builtin:tiny-random", "step:sft"] and run["config"]["seed"] == 0


def test_tracked_metrics_are_pass_at_1_and_paired_differences():
    document = {
        "models": {"base": {"gsm8k": {"pass@1": 0.25, "stderr": 0.05}},
                   "tuned": {"gsm8k": {"pass@1": 0.5, "stderr": None}}},
        "comparisons": {"gsm8k": {"tuned": {"baseline": "base", "difference": 0.25, "stderr": 0.1}}},
    }
    assert evaluate.tracked_metrics(document) == {
        "gsm8k/pass@1/base": 0.25, "gsm8k/pass@1_stderr/base": 0.05, "gsm8k/pass@1/tuned": 0.5,
        "gsm8k/minus_base/tuned": 0.25, "gsm8k/minus_base_stderr/tuned": 0.1}


@pytest.mark.parametrize("report_to", ["tensorbord", ["trackio", "mlflow"], ["none", "trackio"]])
def test_report_to_takes_only_known_trackers(report_to):
    with pytest.raises(ValidationError, match="report_to|tracker"):
        sft.Config(uses="sft", input="data", model="builtin:tiny-random", report_to=report_to)
    with pytest.raises(ValidationError, match="report_to|tracker"):
        evaluate.Config(uses="evaluate", models=["builtin:tiny-random"], benchmarks=["arith_test"], report_to=report_to)


def test_a_tracker_that_is_not_installed_is_named_before_the_run(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    with pytest.raises(UserError, match="sft: report_to wandb needs the wandb package"):
        check_trackers_installed(["tensorboard", "wandb"], "sft")
    check_trackers_installed(["tensorboard", "trackio"], "sft")
