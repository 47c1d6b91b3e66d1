"""recipes/regenerate-redi-data.yaml end to end on its fixture: every count of the funnel, every grade and every
chosen trace checked against what the fixture's generator knows each trace to be (data/make_openr1_raw.py)."""

import importlib.util
import json
from pathlib import Path

import datasets

from pipeline.commands.cli import main

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "regenerate-redi-data.yaml"


def fixture_truth():
    spec = importlib.util.spec_from_file_location("make_openr1_raw", REPO / "data" / "make_openr1_raw.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_rows_and_kinds()


def test_regenerate_redi_data_on_the_fixture(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe names the fixture relative to the repository
    workdir = tmp_path / "regen"
    assert main(["run", str(RECIPE), "-o", f"workdir={workdir}"]) == 0
    rows, kinds = fixture_truth()
    kept = {str(i) for i, row in enumerate(rows) if row["problem_is_valid"] == "Yes" and row["source"] != "cn_k12"}

    def stats(step):
        return json.loads((workdir / step / "manifest.json").read_text())["stats"]

    assert stats("raw")["rows"] == sum(map(len, kinds)) == 789
    assert stats("kept")["rows"] == sum(len(kinds[int(i)]) for i in kept)

    graded = datasets.load_from_disk(str(workdir / "graded" / "data"))
    assert set(graded["id"]) == kept
    expected_label = {"right": "correct", "right_other_form": "correct", "wrong": "incorrect", "cut": "no_answer"}
    for row in graded:
        kind = kinds[int(row["id"])][row["sample_idx"]]
        assert row["label"] == expected_label[kind], (row["id"], row["sample_idx"], kind, row["completion"][-80:])
        published = rows[int(row["id"])]["correctness"]["math_verify_reparsed_answer"][row["sample_idx"]]
        assert row["published_correct"] is published
    agreement = stats("graded")["published_agreement"]
    agree = sum(row["correct"] == row["published_correct"] for row in graded)
    assert agreement["compared"] == len(graded) and abs(agreement["agreement"] - agree / len(graded)) < 1e-9
    assert 0 < agree < len(graded)  # the fixture plants disagreements

    def first(problem_id, wanted):
        return next((j for j, kind in enumerate(kinds[int(problem_id)]) if kind in wanted), None)

    sft = datasets.load_from_disk(str(workdir / "sft_data" / "data"))
    solved = sorted(i for i in kept if first(i, ("right", "right_other_form")) is not None)
    assert sorted(sft["id"]) == solved
    for row in sft:
        trace = rows[int(row["id"])]["generations"][first(row["id"], ("right", "right_other_form"))]
        assert row["messages"][-1]["content"] == trace
    pairs = datasets.load_from_disk(str(workdir / "pairs" / "data"))
    both = sorted(i for i in solved if first(i, ("wrong",)) is not None)
    assert sorted(pairs["id"]) == both
    for row in pairs:
        generations = rows[int(row["id"])]["generations"]
        assert row["chosen"][-1]["content"] == generations[first(row["id"], ("right", "right_other_form"))]
        assert row["rejected"][-1]["content"] == generations[first(row["id"], ("wrong",))]
    # the run page shows the agreement table, cell by cell as the manifest has it
    page = (workdir / "run-report" / "index.html").read_text()
    table = stats("graded")["published_agreement"]
    for ours in ("correct", "incorrect", "ungraded"):
        for published in ("true", "false", "null"):
            assert f'data-ours="{ours}" data-published="{published}">{table[ours][published]:,}</td>' in page
