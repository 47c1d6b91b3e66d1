"""`distill run --seeds` and `distill compare`: one workdir per seed, steps shared where the key allows, and the
aggregation of evaluations across seeds checked against hand computations."""

import json
from pathlib import Path

import pytest

from pipeline.commands.cli import main
from pipeline.commands.compare import compare_paths, render_markdown

DATA = Path("data/train/arith_train.jsonl").resolve()
RECIPE = """\
name: seeded
seed: 0
workdir: {workdir}
steps:
  problems: {{uses: load, path: {data}, limit: 4}}
  pinned: {{uses: tests.toy_steps, rows: 2, seed: 7}}
  varied: {{uses: tests.toy_steps, input: pinned, rows: 1}}
"""


def manifests(workdir):
    return {p.parent.name: json.loads(p.read_text()) for p in workdir.glob("*/manifest.json")}


def test_seeds_run_once_per_seed_and_share_what_draws_no_seed_or_pins_one(tmp_path, capsys):
    recipe = tmp_path / "seeded.yaml"
    recipe.write_text(RECIPE.format(workdir=tmp_path / "runs", data=DATA))
    assert main(["run", str(recipe), "--seeds", "0,1,2"]) == 0
    out = capsys.readouterr().out
    runs = {seed: manifests(tmp_path / "runs" / f"seed-{seed}") for seed in (0, 1, 2)}
    assert all(set(m) == {"problems", "pinned", "varied"} for m in runs.values())
    # load draws no random numbers (keyed without a seed); `pinned` has its own: both identical in every seed
    for step, seed in (("problems", None), ("pinned", 7)):
        assert {m[step]["key"] for m in runs.values()} == {runs[0][step]["key"]}
        assert all(m[step]["seed"] == seed for m in runs.values())
    assert [runs[s]["varied"]["seed"] for s in (0, 1, 2)] == [0, 1, 2]
    assert len({m["varied"]["key"] for m in runs.values()}) == 3
    assert out.count("copied") >= 4 and "seed 2 (3/3)" in out  # seeds 1 and 2 copy problems and pinned
    assert "seed 1: seeded: 1 step(s) ran, 2 copied" in out

    assert main(["run", str(recipe), "--seeds", "0,1,2"]) == 0  # everything is complete now
    assert capsys.readouterr().out.count("0 step(s) ran") == 3
    # seed-1 is the run `-o seed=1` would make anywhere: the same keys, the same data
    assert main(["run", str(recipe), "-o", "seed=1", "-o", f"workdir={tmp_path / 'plain'}"]) == 0
    plain = manifests(tmp_path / "plain")
    assert {step: m["key"] for step, m in plain.items()} == {step: m["key"] for step, m in runs[1].items()}


@pytest.mark.parametrize("seeds", ["a,b", "0,0", ","])
def test_bad_seeds_are_bad_input(tmp_path, capsys, seeds):
    recipe = tmp_path / "seeded.yaml"
    recipe.write_text(RECIPE.format(workdir=tmp_path / "runs", data=DATA))
    assert main(["run", str(recipe), "--seeds", seeds]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_seed_on_a_step_that_draws_none_is_refused(tmp_path, capsys):
    recipe = tmp_path / "seeded.yaml"
    recipe.write_text(RECIPE.format(workdir=tmp_path / "runs", data=DATA).replace("limit: 4", "limit: 4, seed: 1"))
    assert main(["run", str(recipe)]) == 2
    assert "steps.problems" in capsys.readouterr().err


def results(seed, rates_by_model, baseline="A"):
    """A results.json as evaluate writes it, for one benchmark `b` with per-problem (correct, graded) counts."""
    models = {}
    for model, counts in rates_by_model.items():
        per_problem = {f"p{i}": list(c) for i, c in enumerate(counts)}
        rates = [c / g for c, g in counts]
        models[model] = {"b": {"pass@1": sum(rates) / len(rates), "per_problem": per_problem}}
    return {"models": models, "meta": {"seed": seed, "baseline": baseline}}


def write_run(root, seed, document):
    step = root / f"seed-{seed}" / "report"
    step.mkdir(parents=True)
    (step / "results.json").write_text(json.dumps(document))
    (step / "manifest.json").write_text(json.dumps({"step": "report"}))


def test_compare_aggregates_seeds_by_hand(tmp_path):
    # two problems, two samples each. A: 1/2, 0 | 1, 0 | 0, 0 -> pass@1 .25, .5, 0; B: 1, 1/2 | 1, 1/2 | 1/2, 1/2
    a = [[(1, 2), (0, 2)], [(2, 2), (0, 2)], [(0, 2), (0, 2)]]
    b = [[(2, 2), (1, 2)], [(2, 2), (1, 2)], [(1, 2), (1, 2)]]
    for seed in range(3):
        write_run(tmp_path, seed, results(seed, {"A": a[seed], "B": b[seed]}))
    comparison = compare_paths([tmp_path])["evaluations"]["report"]
    assert comparison["runs"] == ["seed 0", "seed 1", "seed 2"] and comparison["baseline"] == "A"
    score = comparison["scores"]["A"]["b"]
    assert score["mean"] == pytest.approx(0.25) and score["sd"] == pytest.approx(0.25)
    # pooled per problem: p0 (1+2+0)/6 = 1/2, p1 0/6 -> 1/4 ± (sd of [1/2, 0] / sqrt 2 = 1/4)
    assert score["pooled"] == pytest.approx(0.25) and score["pooled_stderr"] == pytest.approx(0.25)
    difference = comparison["differences"]["B"]["b"]
    # per seed B - A: .75 - .25 = .5, .75 - .5 = .25, .5 - 0 = .5
    assert difference["runs"] == pytest.approx({"seed 0": 0.5, "seed 1": 0.25, "seed 2": 0.5})
    assert difference["mean"] == pytest.approx(1.25 / 3)
    assert difference["sd"] == pytest.approx(((1 / 12) ** 2 * 2 + (1 / 6) ** 2) ** 0.5 / 2 ** 0.5)
    assert difference["positive_runs"] == 3
    # pooled: B p0 5/6, p1 3/6 vs A 1/2, 0 -> differences 1/3, 1/2
    assert difference["pooled"]["difference"] == pytest.approx(5 / 12)
    markdown = render_markdown({"evaluations": {"report": comparison}})
    assert "| B | b | +50.0 | +25.0 | +50.0 | +41.7 ± 14.4 | 3/3 |" in markdown
    # the other way round: A - B from the per-problem counts, whatever baseline the runs recorded
    reverse = compare_paths([tmp_path], baseline="B")["evaluations"]["report"]["differences"]["A"]["b"]
    assert reverse["runs"] == pytest.approx({"seed 0": -0.5, "seed 1": -0.25, "seed 2": -0.5})
    assert reverse["positive_runs"] == 0


def test_compare_command_reads_workdirs_and_results_files_and_refuses_none(tmp_path, capsys):
    for seed in range(2):
        write_run(tmp_path / "w", seed, results(seed, {"A": [(1, 2)], "B": [(2, 2)]}))
    files = [str(tmp_path / "w" / f"seed-{seed}" / "report" / "results.json") for seed in range(2)]
    assert main(["compare", *files, "--out", str(tmp_path / "out")]) == 0
    assert "seed 0" in capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert written["evaluations"]["report"]["scores"]["B"]["b"]["mean"] == 1.0
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "no evaluation results" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert main(["compare", str(tmp_path / "w"), "--baseline", "C"]) == 2
    assert "--baseline 'C'" in capsys.readouterr().err
