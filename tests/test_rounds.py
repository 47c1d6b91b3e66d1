"""`rounds`: a block of steps repeated, round k starting from round k-1's model; refused with exit 2 when malformed."""

import json
from pathlib import Path

import pytest

from pipeline.commands.cli import main
from pipeline.core.keys import plan
from pipeline.core.recipe import load_recipe
from pipeline.core.status import status

TINY = "builtin:tiny-random"
RECIPE = """\
name: rounds-test
seed: 0
workdir: {workdir}
models:
  base: builtin:tiny-random
steps:
  problems: {{uses: load, path: {problems}, limit: 4}}
  samples: {{uses: sample, input: problems, model: "${{models.base}}", n: 2, max_tokens: 8}}
  graded: {{uses: verify, input: samples}}
  sft_data: {{uses: select, input: graded}}
  sft: {{uses: sft, input: sft_data, model: "${{models.base}}", lora: {{r: 4}}, batch_size: 2, max_length: 128}}
  merged: {{uses: merge, input: sft}}
  report: {{uses: evaluate, models: ["${{models.base}}", "step:merged@1", "step:merged@2"], benchmarks: [arith_test],
           limit: 2, n: 1, max_tokens: 8}}
rounds: {{steps: [samples, graded, sft_data, sft, merged], count: 2, model: "step:merged"}}
"""


@pytest.fixture
def recipe_path(tmp_path):
    path = tmp_path / "rounds.yaml"
    path.write_text(RECIPE.format(workdir=tmp_path / "runs", problems=Path.cwd() / "data/train/arith_train.jsonl"))
    return path


def test_the_block_expands_into_one_step_per_round_reading_the_previous_rounds_model(recipe_path):
    recipe = load_recipe(recipe_path)
    block = ["samples", "graded", "sft_data", "sft", "merged"]
    assert list(recipe.steps) == ["problems", *(f"{s}@1" for s in block), *(f"{s}@2" for s in block), "report"]
    assert recipe.steps["samples@1"].model == TINY and recipe.steps["sft@1"].model == TINY
    assert recipe.steps["samples@2"].model == "step:merged@1" and recipe.steps["sft@2"].model == "step:merged@1"
    assert recipe.dependencies("samples@2") == ["problems", "merged@1"]  # the load step is shared by the rounds
    assert recipe.dependencies("graded@2") == ["samples@2"] and recipe.dependencies("merged@2") == ["sft@2"]
    assert recipe.steps["report"].models == [TINY, "step:merged@1", "step:merged@2"]
    # what recipe.json records, for `distill status WORKDIR` and the run page
    assert recipe.document["steps"]["sft_data@2"] == {"uses": "select", "input": "graded@2"}


def test_an_evaluate_step_in_the_block_compares_each_round_with_the_one_before(recipe_path):
    text = recipe_path.read_text().replace("[samples, graded, sft_data, sft, merged]",
                                           "[samples, graded, sft_data, sft, merged, check]")
    text = text.replace("  report:", '  check: {uses: evaluate, models: ["${models.base}", "step:merged"], '
                                     "benchmarks: [arith_test]}\n  report:")
    recipe_path.write_text(text.replace("count: 2", "count: 3").replace('"step:merged@2"]', '"step:merged@3"]'))
    recipe = load_recipe(recipe_path)
    assert [recipe.steps[f"check@{k}"].models for k in (1, 2, 3)] == [
        [TINY, "step:merged@1"], ["step:merged@1", "step:merged@2"], ["step:merged@2", "step:merged@3"]]


def test_overrides_apply_to_every_round(recipe_path):
    recipe = load_recipe(recipe_path, ["steps.samples.n=3", "rounds.count=1", "steps.report.models=[step:merged@1]"])
    assert [name for name in recipe.steps if name.startswith("samples")] == ["samples@1"]
    assert recipe.steps["samples@1"].n == 3


@pytest.mark.parametrize("mutate, expected", [
    (lambda t: t.replace("[samples, graded,", "[samples, gradd,"), "rounds.steps.1: no step named 'gradd'"),
    (lambda t: t.replace("count: 2", "count: 0"), "rounds.count: required: how many rounds, an integer >= 1"),
    (lambda t: t.replace("count: 2", "count: two"), "rounds.count: required: how many rounds"),
    (lambda t: t.replace('model: "step:merged"}', 'model: "step:graded"}'),
     "rounds.model: required: step:STEP, the block step whose model the next round starts from (got 'step:graded'; "
     "the block's model steps: step:sft, step:merged)"),
    (lambda t: t.replace('model: "step:merged"}', "model: merged}"), "rounds.model: required: step:STEP"),
    (lambda t: t.replace("[samples, graded, sft_data, sft, merged]", "[samples, sft_data, sft, merged]"),
     "rounds.steps: the block must be consecutive steps of `steps`, in their order"),
    (lambda t: t.replace("count: 2,", "count: 2, every: 1,"), "rounds.every: unknown key"),
    (lambda t: t.replace('"step:merged@2"]', '"step:merged"]'),
     "steps.report.models.2: 'merged' is repeated by `rounds` (2 rounds), so the name is ambiguous: name one round, "
     "merged@1 ... merged@2"),
    (lambda t: t.replace('"step:merged@2"]', '"step:merged@3"]'),
     "steps.report.models.2: 'merged@3': there is no round 3 (rounds.count is 2)"),
    (lambda t: t.replace("input: sft_data,", "input: sft_data@1,"),
     "steps.sft.input: 'sft_data@1': inside the rounds block, name block steps without @ROUND"),
    (lambda t: t.replace("limit: 4}\n", "limit: 4}\n  early: {uses: verify, input: samples@1}\n"),
     "steps.early.input: step 'samples@1' runs later"),
    (lambda t: t.replace("[samples, graded, sft_data, sft, merged]", "[merged]"),
     "rounds: no step of the block reads a model from outside it, so round 2 cannot start from round 1's"),
])
def test_a_bad_rounds_block_exits_2_naming_the_file_and_key(recipe_path, tmp_path, capsys, mutate, expected):
    recipe_path.write_text(mutate(recipe_path.read_text()))
    assert main(["run", str(recipe_path)]) == 2
    err = capsys.readouterr().err
    assert str(recipe_path) in err and expected in err and "(line " in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_two_rounds_on_tiny_random_sample_round_2_from_round_1s_model(recipe_path, tmp_path, capsys):
    """The whole block twice on builtin:tiny-random, through the CLI (--dry-run: tiny budgets, and `select` lets
    incorrect samples stand in so that there is something to train on; the evaluation is left out, it would load
    three more engines); the lineage is read back from the keys."""
    assert main(["run", str(recipe_path), "--dry-run", "--until", "merged@2"]) == 0
    out = capsys.readouterr().out
    assert "round 1/2, from builtin:tiny-random" in out and "round 2/2, from step:merged@1" in out
    workdir = tmp_path / "runs-dry-run"
    rows = status(workdir)
    assert [row["round"] for row in rows] == [None, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, None]
    assert [row["state"] for row in rows] == ["complete"] * 11 + ["pending"]  # the evaluation, after --until
    manifests = {row["step"]: json.loads((workdir / row["step"] / "manifest.json").read_text()) for row in rows[:-1]}
    key = {name: manifest["key"] for name, manifest in manifests.items()}
    # round 2 samples from the model round 1 merged, and trains on top of it ...
    assert manifests["samples@2"]["parents"] == {"problems": key["problems"], "merged@1": key["merged@1"]}
    assert manifests["sft@2"]["parents"] == {"sft_data@2": key["sft_data@2"], "merged@1": key["merged@1"]}
    # ... which round 1 trained on its own samples, drawn from the base model
    assert manifests["merged@1"]["parents"] == {"sft@1": key["sft@1"]}
    assert manifests["sft@1"]["parents"] == {"sft_data@1": key["sft_data@1"]}
    assert manifests["sft_data@1"]["parents"] == {"graded@1": key["graded@1"]}
    assert manifests["graded@1"]["parents"] == {"samples@1": key["samples@1"]}
    assert manifests["samples@1"]["parents"] == {"problems": key["problems"]}
    assert manifests["samples@1"]["inputs"]["models"] == {TINY: manifests["samples@1"]["inputs"]["models"][TINY]}
    assert manifests["samples@2"]["inputs"]["models"] == {}  # a step's model is keyed by that step's key
    assert len(set(key.values())) == len(key)
    # what the run page's by-round section reads (round 0: the model round 1 starts from)
    assert json.loads((workdir / "recipe.json").read_text())["models_by_round"] == [TINY, "step:merged@1",
                                                                                    "step:merged@2"]
    # the samples themselves name the model that drew them
    import datasets

    assert set(datasets.load_from_disk(str(workdir / "samples@1" / "data"))["model"]) == {TINY}
    assert set(datasets.load_from_disk(str(workdir / "samples@2" / "data"))["model"]) == {"step:merged@1"}

    # The content-key rule holds per round: a second run skips everything; forcing round 2's training re-runs
    # round 2 from there on and what reads it, and nothing of round 1.
    recipe = load_recipe(recipe_path)
    assert {step.action for step in plan(recipe, dry_run=True, until="merged@2")} == {"skip"}
    runs = [step.name for step in plan(recipe, dry_run=True, force=["sft@2"]) if step.action == "run"]
    assert runs == ["sft@2", "merged@2", "report"]

    assert main(["status", str(workdir)]) == 0
    table = capsys.readouterr().out
    assert "round" in table and "samples@2" in table and "complete" in table


def by_round_results(tmp_path) -> None:
    """An evaluation of three rounds' models (round 0: the start), 4 problems, 4 samples each."""
    correct = {TINY: [1, 0, 2, 1], "step:merged@1": [2, 1, 2, 1], "step:merged@2": [4, 1, 3, 2]}  # of 4, per problem
    document = {"meta": {"seed": 0, "baseline": TINY}, "models": {
        model: {"arith_test": {"pass@1": sum(counts) / 16, "stderr": 0.05, "n": 4,
                               "per_problem": {f"p{i}": [c, 4] for i, c in enumerate(counts)}}}
        for model, counts in correct.items()}}
    (tmp_path / "results.json").write_text(json.dumps(document))


def test_distill_run_shows_accuracy_by_round_and_each_round_minus_the_one_before(recipe_path, tmp_path, capsys,
                                                                               monkeypatch):
    from types import SimpleNamespace

    from rich.console import Console

    from pipeline.commands.run_command import _print_rounds

    monkeypatch.setattr("pipeline.commands.run_command.console", Console(width=200))  # one line per row
    by_round_results(tmp_path)
    _print_rounds(load_recipe(recipe_path), {"report": SimpleNamespace(name="report",
                                                                      artifact=SimpleNamespace(path=tmp_path))})
    rows = [line.split("│")[1:-1] for line in capsys.readouterr().out.splitlines() if "arith_test" in line]
    cells = [[cell.strip() for cell in row] for row in rows]
    assert [row[:4] for row in cells] == [["0", TINY, "arith_test", "25.0 ± 5.0"],
                                          ["1", "step:merged@1", "arith_test", "37.5 ± 5.0"],
                                          ["2", "step:merged@2", "arith_test", "62.5 ± 5.0"]]
    assert cells[0][4] == "–"
    assert cells[1][4].startswith("+12.5 ± 7.2 [") and cells[2][4].startswith("+25.0 ± 10.2 [")


def test_the_run_page_plots_accuracy_by_round_with_paired_intervals(recipe_path, tmp_path):
    import re
    from types import SimpleNamespace

    from pipeline.commands.run_report.evaluations import rounds_section

    by_round_results(tmp_path)
    step = SimpleNamespace(name="report", path=tmp_path)
    section = rounds_section(step, load_recipe(recipe_path).rounds.models_by_round())
    accuracy, gains = re.findall(r"<figure class=chart data-points=\"(\d)\">.*?</figure>", section)
    assert (accuracy, gains) == ("3", "2")  # rounds 0-2; rounds 1 and 2 minus the one before
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr><td>.*?</tr>", section)]
    assert [row[:3] for row in cells] == [["0", TINY, "25.0 ± 5.0"], ["1", "step:merged@1", "37.5 ± 5.0"],
                                          ["2", "step:merged@2", "62.5 ± 5.0"]]
    assert cells[0][3] == "–" and cells[1][3].startswith("+12.5 [") and cells[2][3].startswith("+25.0 [")
    assert "round 1: +12.5 [" in section  # the paired difference's point and interval, on its chart
    assert rounds_section(step, None) == ""  # a recipe without rounds
