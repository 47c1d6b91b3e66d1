"""One contract for every command's outputs (`pipeline.core.outputs`), through the CLI: a command writes into a directory
it made, or a new path; an existing file or a directory no command made is refused (exit 2, naming it) unless
--overwrite; a step's input never, whatever the flags; and a refused command leaves every file as it was."""

import hashlib
import io
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import datasets
import pytest
from rich.console import Console

from pipeline.commands.cli import main
from pipeline.core import runner
from pipeline.core.errors import UserError
from pipeline.core.outputs import EVAL, mark
from pipeline.core.recipe import load_recipe
from pipeline.core.workdir import workdir_lock

ROWS = '{"id": "a", "problem": "1 + 1?", "answer": "2"}\n{"id": "b", "problem": "2 + 2?", "answer": "4"}\n'
RESULTS = {"models": {"m": {"arith_test:2": {"pass@1": 0.5, "stderr": 0.5, "per_problem": {"a": [1, 1], "b": [0, 1]}}}},
           "meta": {"seed": 0}}


def tree(root: Path) -> dict[str, str]:
    """Every path under root with its content's sha256 ("dir" for a directory)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@contextmanager
def refused(root: Path, capsys, *named: str):
    """The block's command must exit 2 with a message naming each of `named`, no traceback, and change nothing."""
    before = tree(root)
    capsys.readouterr()
    codes = []
    yield codes.append
    err = capsys.readouterr().err
    assert codes == [2], err
    assert all(name in err for name in named), err
    assert "Traceback" not in err
    assert tree(root) == before


@pytest.fixture
def project(tmp_path, monkeypatch, capsys):
    """A run of a load step whose input, problems.jsonl in the current directory, has the name the export of its
    output had by default before (`<step><extension>` in the current directory)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "problems.jsonl").write_text(ROWS)
    (tmp_path / "recipe.yaml").write_text(
        "name: safety\nworkdir: runs/safety\nsteps:\n  problems: {uses: load, path: problems.jsonl}\n")
    assert main(["run", "recipe.yaml"]) == 0
    capsys.readouterr()
    return tmp_path


STEP = "runs/safety/problems"


def test_export_writes_into_the_step_dir_by_default(project):
    assert main(["export", STEP, "--format", "jsonl"]) == 0
    written = project / STEP / "export" / "problems.jsonl"
    assert [json.loads(line)["id"] for line in written.read_text().splitlines()] == ["a", "b"]
    assert (project / "problems.jsonl").read_text() == ROWS  # the load step's input, which the old default replaced
    assert main(["export", STEP, "--format", "jsonl"]) == 0  # its own file, replaced without --overwrite
    assert sorted(p.name for p in written.parent.iterdir()) == [".distillery", "problems.jsonl"]


def test_export_onto_an_existing_file_needs_overwrite(project, capsys):
    (project / "notes.txt").write_text("mine")
    with refused(project, capsys, "notes.txt", "--overwrite") as exit_code:
        exit_code(main(["export", STEP, "--format", "jsonl", "--out", "notes.txt"]))
    assert main(["export", STEP, "--format", "jsonl", "--out", "notes.txt", "--overwrite"]) == 0
    assert len((project / "notes.txt").read_text().splitlines()) == 2


@pytest.mark.parametrize("target", ["problems.jsonl", f"{STEP}/data/extra.jsonl", f"{STEP}/manifest.json"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_never_writes_a_steps_input(project, capsys, target, overwrite):
    """The load step's input file, and the step's own data and manifest (what later steps read), even with
    --overwrite."""
    with refused(project, capsys, target, "never") as exit_code:
        exit_code(main(["export", STEP, "--format", "jsonl", "--out", target, *overwrite]))


def test_export_onto_an_existing_directory_is_refused(project, capsys):
    (project / "somewhere").mkdir()
    with refused(project, capsys, "somewhere", "is a directory") as exit_code:
        exit_code(main(["export", STEP, "--format", "jsonl", "--out", "somewhere", "--overwrite"]))


@pytest.fixture
def evaluation(tmp_path):
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "results.json").write_text(json.dumps(RESULTS))
    return tmp_path / "ev"


def test_compare_out_writes_into_a_directory_it_made_or_needs_overwrite(tmp_path, evaluation, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "compare.md").write_text("my notes")
    with refused(tmp_path, capsys, str(mine), "--overwrite") as exit_code:
        exit_code(main(["compare", str(evaluation), "--out", str(mine)]))
    assert main(["compare", str(evaluation), "--out", str(mine), "--overwrite"]) == 0
    assert "# Comparison across runs" in (mine / "compare.md").read_text()
    assert not (mine / ".distillery").exists()  # someone's directory: written into, never claimed
    fresh = tmp_path / "fresh"
    assert main(["compare", str(evaluation), "--out", str(fresh)]) == 0
    assert main(["compare", str(evaluation), "--out", str(fresh)]) == 0  # its own files
    assert sorted(p.name for p in fresh.iterdir()) == [".distillery", "compare.json", "compare.md"]


EVAL_ARGV = ["eval", "builtin:tiny-random", "--benchmarks", "arith_test:1", "--preset", "quick"]


def test_eval_out_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("mine")
    with refused(tmp_path, capsys, "a-file", "is a file") as exit_code:
        exit_code(main([*EVAL_ARGV, "--out", "a-file", "--overwrite"]))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with refused(tmp_path, capsys, "mine", "--overwrite") as exit_code:
        exit_code(main([*EVAL_ARGV, "--out", "mine"]))
    # a model dir the evaluation reads: its files are the model's identity
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "config.json").write_text("{}")
    with refused(tmp_path, capsys, "mymodel", "never") as exit_code:
        exit_code(main(["eval", "mymodel", "--benchmarks", "arith_test:1", "--out", "mymodel/eval", "--overwrite"]))


def test_report_while_a_run_holds_the_workdir_is_refused(project, capsys):
    workdir = project / "runs" / "safety"
    with workdir_lock(workdir), refused(project, capsys, str(workdir), "is using this workdir") as exit_code:
        exit_code(main(["report", str(workdir)]))
    assert main(["report", str(workdir)]) == 0


@pytest.mark.parametrize("text, problem", [
    ("{\"models\": ", "not valid JSON"),
    (json.dumps({"scores": [1, 2]}), "no `models`"),
    (json.dumps({"models": {"m": {"b": {"accuracy": 0.5}}}}), "models.m.b has no numeric pass@1"),
    (json.dumps({"models": {"m": {"b": {"pass@1": 0.5, "per_problem": {"a": [1, 0]}}}}}), "per_problem"),
])
def test_compare_of_a_foreign_or_corrupt_results_json(tmp_path, capsys, text, problem):
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "results.json").write_text(text)
    with refused(tmp_path, capsys, str(tmp_path / "ev" / "results.json"), problem) as exit_code:
        exit_code(main(["compare", str(tmp_path / "ev"), "--out", str(tmp_path / "out")]))


@pytest.mark.parametrize("text, problem", [
    ("{\"meta\": ", "cannot be read as JSON"),
    (json.dumps(RESULTS), "meta.models"),  # compare's results, without what re-grading reads
    (json.dumps({"models": {}, "meta": "r1"}), "no `meta`"),
])
def test_rescore_of_a_foreign_or_corrupt_results_json(tmp_path, capsys, text, problem):
    run_dir = tmp_path / "ev"
    run_dir.mkdir()
    mark(run_dir, EVAL)  # as `distill eval --out` leaves it
    (run_dir / "results.json").write_text(text)
    datasets.Dataset.from_list([{"id": "a", "completion": "2"}]).save_to_disk(str(run_dir / "samples"))
    with refused(tmp_path, capsys, str(run_dir / "results.json"), problem) as exit_code:
        exit_code(main(["eval", "--rescore", str(run_dir)]))


def test_rescore_of_a_directory_eval_did_not_make_needs_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "theirs"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(RESULTS))
    with refused(tmp_path, capsys, str(run_dir), "--overwrite") as exit_code:
        exit_code(main(["eval", "--rescore", str(run_dir)]))
    with refused(tmp_path, capsys, str(run_dir), "not an evaluation output") as exit_code:
        exit_code(main(["eval", "--rescore", str(run_dir), "--overwrite"]))


def test_a_run_that_loses_the_lock_never_removes_the_winners_workdir(tmp_path, monkeypatch):
    """Two runs of a new workdir: the first makes it, and before it locks it the second locks it and runs. The
    first is refused and leaves the directory it made to the run using it."""
    workdir = tmp_path / "runs" / "race"
    recipe = tmp_path / "race.yaml"
    recipe.write_text(f"name: race\nworkdir: {workdir}\nsteps:\n  data: {{uses: tests.toy_steps}}\n")
    monkeypatch.setenv("TOY_SLEEP_S", "1")  # the winner is inside its step when the loser is refused
    winner_locked = threading.Event()
    make_dir, workdir_lock = runner.make_dir, runner.workdir_lock

    def make_dir_then_wait(*args):
        made = make_dir(*args)
        if threading.current_thread().name == "loser":
            assert made and winner_locked.wait(60)  # the delay between making the workdir and locking it
        return made

    @contextmanager
    def lock_and_tell(path):
        with workdir_lock(path):
            if threading.current_thread().name == "winner":
                winner_locked.set()
            yield

    monkeypatch.setattr(runner, "make_dir", make_dir_then_wait)
    monkeypatch.setattr(runner, "workdir_lock", lock_and_tell)
    outcomes = {}

    def run():
        try:
            outcomes[threading.current_thread().name] = run_recipe_quietly(recipe)
        except Exception as error:  # noqa: BLE001 - the test reads it
            outcomes[threading.current_thread().name] = error

    threads = [threading.Thread(target=run, name="loser")]
    threads[0].start()
    while not workdir.exists():
        time.sleep(0.01)
    threads.append(threading.Thread(target=run, name="winner"))
    threads[1].start()
    for thread in threads:
        thread.join(120)
    assert isinstance(outcomes["loser"], UserError) and "is using this workdir" in str(outcomes["loser"])
    assert not isinstance(outcomes["winner"], Exception), outcomes["winner"]
    assert outcomes["winner"]["data"].state == "ran"
    assert (workdir / "data" / "manifest.json").is_file() and (workdir / ".distillery").is_file()


def run_recipe_quietly(recipe: Path):
    return runner.run_recipe(load_recipe(recipe), console=Console(file=io.StringIO()))
