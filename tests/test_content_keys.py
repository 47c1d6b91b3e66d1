"""Content-addressed steps: a step re-runs exactly when something it reads changes, says why, and the runner never
replaces or deletes what it did not write."""

import json
import os
import time

import pytest

from pipeline.commands.cli import main
from pipeline.core.fingerprints import Fingerprints
from pipeline.core.keys import plan
from pipeline.core.recipe import load_recipe
from pipeline.core.runner import run_recipe

RECIPE = """\
name: keyed
seed: 0
workdir: {workdir}
steps:
  problems: {{uses: load, path: {data}}}
  first: {{uses: tests.toy_steps, input: problems, rows: 1}}
  second: {{uses: tests.toy_steps, input: first, rows: 1}}
  side: {{uses: tests.toy_steps, rows: 2}}
  reader: {{uses: tests.toy_steps, rows: 1, model: {model}}}
"""


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


ROWS = [{"id": str(i), "problem": f"{i} + 1?", "answer": str(i + 1), "value": f"row-{i}"} for i in range(3)]


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "problems.jsonl"
    write_rows(data, ROWS)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights v1")
    (model / "README.md").write_text("a card")
    recipe = tmp_path / "keyed.yaml"
    recipe.write_text(RECIPE.format(workdir=tmp_path / "runs", data=data, model=model))
    return recipe, data, model


def states(outcomes):
    return {name: o.state for name, o in outcomes.items()}


def reasons(recipe_path):
    return {step.name: step.reasons for step in plan(load_recipe(recipe_path))}


def test_editing_a_data_row_reruns_load_and_exactly_its_downstream(setup):
    recipe, data, _ = setup
    run_recipe(load_recipe(recipe))
    write_rows(data, ROWS[:2] + [{**ROWS[2], "value": "edited"}])
    why = reasons(recipe)
    assert why["problems"] == [f"input file {data} changed"]
    assert why["first"] == ["parent problems re-runs"] and why["second"] == ["parent first re-runs"]
    assert why["side"] == [] and why["reader"] == []
    outcomes = run_recipe(load_recipe(recipe))
    assert states(outcomes) == {"problems": "ran", "first": "ran", "second": "ran", "side": "skipped",
                                "reader": "skipped"}
    assert "edited" in outcomes["second"].artifact.dataset()["value"]


def test_touching_a_file_without_changing_it_reruns_nothing(setup):
    recipe, data, model = setup
    run_recipe(load_recipe(recipe))
    later = time.time() + 5
    for path in (data, model / "model.safetensors"):
        os.utime(path, (later, later))
    assert set(states(run_recipe(load_recipe(recipe))).values()) == {"skipped"}


def test_replacing_a_local_models_weights_reruns_the_steps_that_read_it(setup):
    recipe, _, model = setup
    run_recipe(load_recipe(recipe))
    (model / "README.md").write_text("an edited card changes no weights")
    assert set(states(run_recipe(load_recipe(recipe))).values()) == {"skipped"}
    (model / "model.safetensors").write_bytes(b"weights v2")
    why = reasons(recipe)["reader"]
    assert len(why) == 1 and why[0].startswith(f"model {model}: dir sha256:"), why
    outcomes = run_recipe(load_recipe(recipe))
    assert [name for name, state in states(outcomes).items() if state == "ran"] == ["reader"]


def test_a_library_version_change_reruns_the_steps_that_depend_on_it(tmp_path, monkeypatch):
    """verify depends on math-verify: simulate an upgrade by changing the version the plan reads."""
    import pipeline.core.keys as keys

    recipe = tmp_path / "regrade.yaml"
    recipe.write_text(f"""\
name: regrade
workdir: {tmp_path / 'runs'}
steps:
  completions: {{uses: load, path: data/examples/completions.jsonl, unique_ids: false}}
  graded: {{uses: verify, input: completions, workers: 1}}
""")
    real = keys.library_versions()
    first = run_recipe(load_recipe(recipe))
    assert first["graded"].artifact.path.joinpath("manifest.json").exists()
    manifest = json.loads((first["graded"].artifact.path / "manifest.json").read_text())
    assert manifest["inputs"]["libraries"]["math-verify"] == real["math-verify"]
    monkeypatch.setattr(keys, "library_versions", lambda: {**real, "math-verify": "99.0.0"})
    why = reasons(recipe)
    assert why == {"completions": [], "graded": [f"math-verify {real['math-verify']} -> 99.0.0"]}
    assert states(run_recipe(load_recipe(recipe))) == {"completions": "skipped", "graded": "ran"}


def test_status_of_a_recipe_names_each_reason_and_runs_nothing(setup, capsys):
    recipe, data, _ = setup
    assert main(["status", str(recipe)]) == 0
    assert "no output yet" in capsys.readouterr().out
    assert not (recipe.parent / "runs").exists()  # asking never creates the workdir
    run_recipe(load_recipe(recipe))
    write_rows(data, ROWS + [{"id": "9", "problem": "9 + 1?", "answer": "10", "value": "new"}])
    assert main(["status", str(recipe), "-o", "steps.side.rows=5"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for reason in ("changed", "parent problems re-runs", "parent first re-runs", "config: rows 2 -> 5",
                   "up to date"):
        assert reason in out, (reason, out)
    assert run_recipe(load_recipe(recipe))["problems"].artifact.stats["rows"] == 4


def test_run_prints_why_each_step_runs(setup, capsys):
    recipe, _, _ = setup
    run_recipe(load_recipe(recipe))
    capsys.readouterr()
    assert main(["run", str(recipe), "-o", "steps.second.rows=2"]) == 0
    out = capsys.readouterr().out
    assert "runs because: config: rows 1 -> 2" in out


def test_a_cached_plan_reads_no_file_again(setup):
    recipe, _, _ = setup
    run_recipe(load_recipe(recipe))
    fingerprints = Fingerprints(recipe.parent / "runs" / ".fingerprints.json")
    plan(load_recipe(recipe), fingerprints=fingerprints)
    assert fingerprints.hashed_bytes == 0


def test_an_undeclared_path_setting_of_a_users_step_is_an_input(setup):
    recipe, _, _ = setup
    notes = recipe.parent / "notes.txt"
    notes.write_text("v1")
    overrides = [f"steps.side.notes={notes}"]
    run_recipe(load_recipe(recipe, overrides))
    notes.write_text("v2")
    assert {s.name: s.reasons for s in plan(load_recipe(recipe, overrides))}["side"] == \
        [f"input file {notes} changed"]


def test_user_file_and_directory_named_like_steps_survive(setup, capsys):
    recipe, _, _ = setup
    workdir = recipe.parent / "runs"
    run_recipe(load_recipe(recipe), until="problems")
    (workdir / "first").write_text("my notes")
    (workdir / "side").mkdir()
    (workdir / "side" / "results.csv").write_text("my results")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "was not written by Distillery" in err and "Traceback" not in err
    assert (workdir / "first").read_text() == "my notes"
    assert (workdir / "side" / "results.csv").read_text() == "my results"
    assert not (workdir / ".first.tmp").exists()


def test_a_non_empty_directory_not_made_by_distill_is_refused(tmp_path, capsys, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "mine.txt").write_text("keep me")
    (project / "recipe.yaml").write_text("name: here\nworkdir: .\nsteps:\n  data: {uses: tests.toy_steps}\n")
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(os.path.dirname(os.path.dirname(__file__))))
    assert main(["run", "recipe.yaml"]) == 2
    assert "did not create" in capsys.readouterr().err
    assert sorted(p.name for p in project.rglob("*")) == ["data", "mine.txt", "recipe.yaml"]
    # --dry-run works with any workdir: it writes beside it, never into it
    assert main(["run", "recipe.yaml", "--dry-run"]) == 0
    assert (tmp_path / "project-dry-run" / "data" / "manifest.json").is_file()
    assert (project / "data" / "mine.txt").read_text() == "keep me"


def test_force_starts_from_clean_scratch(setup):
    recipe, _, _ = setup
    outcomes = run_recipe(load_recipe(recipe))
    scratch = recipe.parent / "runs" / ".side.scratch"
    scratch.mkdir()
    (scratch / "KEY").write_text(outcomes["side"].artifact.key)
    (scratch / "progress").write_text("left by a crashed run of the same key")
    forced = run_recipe(load_recipe(recipe), force=["side"])
    assert forced["side"].state == "ran" and forced["side"].artifact.stats["found_in_scratch"] == []


def test_scratch_of_the_same_key_is_resumed_without_force(setup):
    recipe, _, _ = setup
    run_recipe(load_recipe(recipe), until="problems")
    side = {s.name: s for s in plan(load_recipe(recipe))}["side"]
    scratch = recipe.parent / "runs" / ".side.scratch"
    scratch.mkdir()
    (scratch / "KEY").write_text(side.key)
    (scratch / "progress").write_text("saved")
    assert "resumes the work an interrupted run saved" in {s.name: s for s in plan(load_recipe(recipe))}["side"].reasons
    assert run_recipe(load_recipe(recipe))["side"].artifact.stats["found_in_scratch"] == ["progress"]


def test_pinned_hub_revision_is_in_the_key_and_unpinned_warns(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    # an unpinned org/name must be in the hub cache (else it reads as a local dir written without ./ and is refused)
    cached = tmp_path / "hub" / "models--Qwen--Qwen2.5-Math-1.5B"
    (cached / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (cached / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(f"""\
name: hub
workdir: {tmp_path / 'runs'}
models:
  pinned: {{id: Qwen/Qwen2.5-Math-1.5B, revision: 4a83ca6e4526a4f2da3aa259ec36c259f66b2ab2}}
  loose: Qwen/Qwen2.5-Math-1.5B
steps:
  a: {{uses: tests.toy_steps, model: "${{models.pinned}}"}}
  b: {{uses: tests.toy_steps, model: "${{models.loose}}"}}
""")
    steps = {s.name: s for s in plan(load_recipe(recipe))}
    assert steps["a"].inputs["models"] == {
        "Qwen/Qwen2.5-Math-1.5B@4a83ca6e4526a4f2da3aa259ec36c259f66b2ab2":
            "hub Qwen/Qwen2.5-Math-1.5B@4a83ca6e4526a4f2da3aa259ec36c259f66b2ab2"}
    other = {s.name: s for s in plan(load_recipe(recipe, ["models.pinned.revision=main"]))}
    assert other["a"].key != steps["a"].key and other["b"].key == steps["b"].key
    assert main(["run", str(recipe)]) == 0
    assert "model Qwen/Qwen2.5-Math-1.5B has no revision" in capsys.readouterr().out
