"""The runner: skip what is complete, re-run what changed and what reads it, survive a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.commands.cli import main
from pipeline.core.recipe import load_recipe
from pipeline.core.runner import run_recipe
from pipeline.core.status import status

RECIPE = """\
name: chain
seed: 3
workdir: {workdir}
steps:
  first: {{uses: tests.toy_steps, rows: 2}}
  second: {{uses: tests.toy_steps, input: first, rows: 1}}
  third: {{uses: tests.toy_steps, input: second, rows: 1}}
  side: {{uses: tests.toy_steps, input: first, rows: 4}}
"""


@pytest.fixture
def recipe_path(tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text(RECIPE.format(workdir=tmp_path / "runs"))
    return path


def states(outcomes):
    return {name: o.state for name, o in outcomes.items()}


def test_second_run_skips_everything(recipe_path):
    first = run_recipe(load_recipe(recipe_path))
    assert set(states(first).values()) == {"ran"}
    assert first["third"].artifact.dataset()["value"] == ["first-0", "first-1", "second-0", "third-0"]
    again = run_recipe(load_recipe(recipe_path))
    assert set(states(again).values()) == {"skipped"}
    assert {n: o.artifact.key for n, o in again.items()} == {n: o.artifact.key for n, o in first.items()}


def test_override_reruns_that_step_and_downstream_only(recipe_path):
    run_recipe(load_recipe(recipe_path))
    outcomes = run_recipe(load_recipe(recipe_path, ["steps.second.rows=2"]))
    assert states(outcomes) == {"first": "skipped", "second": "ran", "third": "ran", "side": "skipped"}
    assert outcomes["third"].artifact.dataset()["value"][-3:] == ["second-0", "second-1", "third-0"]


def test_seed_change_reruns_everything(recipe_path):
    run_recipe(load_recipe(recipe_path))
    assert set(states(run_recipe(load_recipe(recipe_path, ["seed=4"]))).values()) == {"ran"}


def test_force_reruns_step_and_its_readers(recipe_path):
    run_recipe(load_recipe(recipe_path))
    outcomes = run_recipe(load_recipe(recipe_path), force=["second"])
    assert states(outcomes) == {"first": "skipped", "second": "ran", "third": "ran", "side": "skipped"}
    assert set(states(run_recipe(load_recipe(recipe_path), force=["all"])).values()) == {"ran"}


def test_until_stops_after_the_step(recipe_path):
    outcomes = run_recipe(load_recipe(recipe_path), until="second")
    assert list(outcomes) == ["first", "second"]
    assert [r["state"] for r in status(recipe_path.parent / "runs")] == ["complete", "complete", "pending", "pending"]


def test_unknown_until_or_force_is_bad_input(recipe_path, capsys):
    assert main(["run", str(recipe_path), "--until", "fourth"]) == 2
    assert main(["run", str(recipe_path), "--force", "fourth"]) == 2
    assert "no step named 'fourth'" in capsys.readouterr().err


def test_manifest_records_key_parents_versions_and_seed(recipe_path):
    outcomes = run_recipe(load_recipe(recipe_path))
    manifest = json.loads((outcomes["second"].artifact.path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["seed"] == 3
    assert manifest["parents"] == {"first": outcomes["first"].artifact.key}
    assert manifest["stats"]["rows"] == 3 and manifest["config"]["rows"] == 1
    assert {"python", "torch", "transformers", "trl", "datasets"} <= set(manifest["versions"])


def test_failed_step_leaves_no_complete_output(recipe_path, tmp_path):
    recipe = load_recipe(recipe_path, ["steps.second.fail=true"])
    with pytest.raises(RuntimeError, match="toy step asked to fail"):
        run_recipe(recipe)
    workdir = tmp_path / "runs"
    assert not (workdir / "second").exists()
    assert [r["state"] for r in status(workdir)][:2] == ["complete", "failed"]


def test_dry_run_uses_its_own_workdir_and_small_settings(recipe_path, tmp_path):
    outcomes = run_recipe(load_recipe(recipe_path), dry_run=True)
    assert outcomes["side"].artifact.path == tmp_path / "runs-dry-run" / "side"
    assert outcomes["side"].artifact.stats["rows"] == 2  # 1 from first + 1 (rows 4 shrunk to 1)
    assert not (tmp_path / "runs").exists()


def test_killed_step_never_looks_complete_and_rerun_finishes(recipe_path, tmp_path):
    workdir = tmp_path / "runs"
    run_recipe(load_recipe(recipe_path), until="first")
    distill = str(Path(sys.executable).with_name("distill"))
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "TOY_SLEEP_S": "60"}
    # Change `second` so an older complete output exists and must not survive as if it were new.
    run_recipe(load_recipe(recipe_path), until="second")
    proc = subprocess.Popen([distill, "run", str(recipe_path), "-o", "steps.second.rows=3"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (workdir / ".second.tmp").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = {r["step"]: r["state"] for r in status(workdir)}
    assert rows["first"] == "complete" and rows["second"] == "incomplete", rows
    outcomes = run_recipe(load_recipe(recipe_path, ["steps.second.rows=3"]))
    assert states(outcomes) == {"first": "skipped", "second": "ran", "third": "ran", "side": "ran"}
    assert outcomes["second"].artifact.stats["rows"] == 5
    assert not list(workdir.glob(".second.*"))


def test_status_command_prints_table(recipe_path, tmp_path, capsys):
    run_recipe(load_recipe(recipe_path), until="first")
    assert main(["status", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "first" in out and "complete" in out and "pending" in out
    assert main(["status", str(tmp_path)]) == 2
