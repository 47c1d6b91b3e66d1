"""`distill status` and `distill run` agree on every step, whatever is left on disk: one test decides whether a step's
output is complete (`pipeline.core.artifacts.output_state`); what a killed run left is put right, not counted as a step
that is incomplete; status works in a read-only workdir and refuses a foreign recipe.json or manifest.json with
exit 2, naming it; and a step's key names files by content and place in the package, not by where it is installed.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.commands.cli import main
from pipeline.core import artifacts
from pipeline.core.keys import plan
from pipeline.core.recipe import load_recipe
from pipeline.core.runner import run_recipe
from pipeline.core.status import status

REPO = Path(__file__).resolve().parent.parent

RECIPE = """\
name: chain
seed: 3
workdir: {workdir}
steps:
  first: {{uses: tests.toy_steps, rows: 2}}
  second: {{uses: tests.toy_steps, input: first, rows: 1}}
"""


@pytest.fixture
def recipe_path(tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text(RECIPE.format(workdir=tmp_path / "runs"))
    return path


def states(outcomes):
    return {name: o.state for name, o in outcomes.items()}


def why(recipe_path):
    return {step.name: step.reasons for step in plan(load_recipe(recipe_path))}


def status_of_recipe(recipe_path, capsys):
    assert main(["status", str(recipe_path)]) == 0
    return " ".join(capsys.readouterr().out.split())


def test_deleted_data_is_missing_output_to_status_and_run_alike(recipe_path, tmp_path, capsys):
    workdir = tmp_path / "runs"
    first = run_recipe(load_recipe(recipe_path))
    manifest = json.loads((workdir / "first" / "manifest.json").read_text())
    assert manifest["outputs"] and all(path.startswith("data/") for path in manifest["outputs"])
    shutil.rmtree(workdir / "first" / "data")
    reasons = why(recipe_path)
    assert len(reasons["first"]) == 1 and reasons["first"][0].startswith("output missing (data/"), reasons
    assert reasons["second"] == []  # the same key: what reads it need not run again
    assert "would run first (tests.toy_steps" in status_of_recipe(recipe_path, capsys).replace("  ", " ")
    rows = {row["step"]: row for row in status(workdir)}
    assert rows["first"]["state"] == "incomplete" and rows["first"]["why"].startswith("output missing")
    assert main(["status", str(workdir)]) == 0
    assert "output missing" in capsys.readouterr().out
    again = run_recipe(load_recipe(recipe_path))
    assert states(again) == {"first": "ran", "second": "skipped"}
    assert again["first"].artifact.key == first["first"].artifact.key
    assert again["first"].artifact.dataset()["value"] == ["first-0", "first-1"]
    assert [row["state"] for row in status(workdir)] == ["complete", "complete"]


def test_a_manifest_from_before_the_outputs_list_checks_its_data_dir(recipe_path, tmp_path):
    workdir = tmp_path / "runs"
    run_recipe(load_recipe(recipe_path))
    manifest = json.loads((workdir / "first" / "manifest.json").read_text())
    del manifest["outputs"]
    (workdir / "first" / "manifest.json").write_text(json.dumps(manifest))
    assert why(recipe_path)["first"] == []
    shutil.rmtree(workdir / "first" / "data")
    assert why(recipe_path)["first"] == ["output missing (data/)"]
    assert states(run_recipe(load_recipe(recipe_path))) == {"first": "ran", "second": "skipped"}


def test_a_damaged_data_file_is_not_complete(recipe_path, tmp_path):
    workdir = tmp_path / "runs"
    run_recipe(load_recipe(recipe_path))
    arrow = next((workdir / "first" / "data").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:10])
    assert why(recipe_path)["first"][0].startswith(f"output damaged (data/{arrow.name}: 10 bytes")
    assert states(run_recipe(load_recipe(recipe_path))) == {"first": "ran", "second": "skipped"}


def test_truncated_manifest_is_unreadable_and_run_reruns_it_without_force(recipe_path, tmp_path, capsys):
    workdir = tmp_path / "runs"
    run_recipe(load_recipe(recipe_path))
    manifest = workdir / "first" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    reasons = why(recipe_path)
    assert reasons["first"][0].startswith(f"manifest unreadable ({manifest}: not valid JSON"), reasons
    assert "manifest unreadable" in status_of_recipe(recipe_path, capsys)
    assert main(["status", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert str(manifest) in err and "re-runs the step" in err and "Traceback" not in err
    assert main(["run", str(recipe_path)]) == 0
    assert "runs because: manifest unreadable" in capsys.readouterr().out
    assert [row["state"] for row in status(workdir)] == ["complete", "complete"]
    assert states(run_recipe(load_recipe(recipe_path))) == {"first": "skipped", "second": "skipped"}


def test_leftovers_of_a_killed_publish_are_cleaned_not_incomplete(recipe_path, tmp_path, capsys):
    workdir = tmp_path / "runs"
    outcomes = run_recipe(load_recipe(recipe_path))
    # killed inside `publish`, after moving the old output aside: `.first.old` is a full copy
    shutil.copytree(workdir / "first", workdir / ".first.old")
    # killed after publishing `second`, before removing its scratch dir
    scratch = workdir / ".second.scratch"
    scratch.mkdir()
    (scratch / "KEY").write_text(outcomes["second"].artifact.key)
    (scratch / "progress").write_text("work of the run that completed")
    assert [row["state"] for row in status(workdir)] == ["complete", "complete"]
    assert not (workdir / ".first.old").exists() and not scratch.exists()
    assert main(["status", str(workdir)]) == 0
    assert "incomplete" not in capsys.readouterr().out
    # and by the next run, too
    shutil.copytree(workdir / "first", workdir / ".first.old")
    scratch.mkdir()
    (scratch / "KEY").write_text(outcomes["second"].artifact.key)
    assert states(run_recipe(load_recipe(recipe_path))) == {"first": "skipped", "second": "skipped"}
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".") and p.is_dir()) == []


def test_a_publish_killed_between_its_renames_is_finished(recipe_path, tmp_path):
    workdir = tmp_path / "runs"
    outcomes = run_recipe(load_recipe(recipe_path))
    # killed between `os.replace(final, old)` and `os.replace(tmp, final)`: the new output is whole in .tmp
    os.replace(workdir / "second", workdir / ".second.tmp")
    shutil.copytree(workdir / ".second.tmp", workdir / ".second.old")
    assert why(recipe_path)["second"] == []
    assert {row["step"]: row["state"] for row in status(workdir)}["second"] == "complete"
    assert (workdir / "second" / "manifest.json").is_file()
    assert not (workdir / ".second.tmp").exists() and not (workdir / ".second.old").exists()
    assert Path(run_recipe(load_recipe(recipe_path))["second"].artifact.path) == outcomes["second"].artifact.path


def test_scratch_of_another_key_is_still_incomplete_and_resumed(recipe_path, tmp_path):
    workdir = tmp_path / "runs"
    run_recipe(load_recipe(recipe_path))
    scratch = workdir / ".second.scratch"
    scratch.mkdir()
    (scratch / "KEY").write_text("0123456789abcdef")  # a killed run of another key: its work, not a leftover
    assert {row["step"]: row["state"] for row in status(workdir)}["second"] == "incomplete"
    assert scratch.is_dir()


def test_temp_dirs_of_killed_processes_are_removed(tmp_path, monkeypatch):
    """A parsed data file becomes an Arrow file in the process's own temporary dir; a kill leaves it there, and the
    next run or status removes it (its lock is free), never a live process's."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "problem": f"{i}?", "answer": str(i)}) + "\n" for i in range(50)))
    code = ("import os, signal; from pipeline.text.tables import read_table; ds = read_table(%r); "
            "assert len(ds) == 50; os.kill(os.getpid(), signal.SIGKILL)" % str(data))
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(tmp)}, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in tmp.iterdir()]
    assert [p.name.startswith(artifacts.TEMP_PREFIX) for p in left] == [True], left  # no hf_datasets-* either
    assert list(left[0].glob("*.arrow"))
    live = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.core.artifacts import temp_dir; "
                             "print(temp_dir(), flush=True); time.sleep(60)"],
                            env={**os.environ, "TMPDIR": str(tmp)}, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        live_dir = Path(live.stdout.readline().strip())
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        artifacts.clean_stale_temp_dirs()
        assert not left[0].exists() and live_dir.is_dir()
    finally:
        live.kill()
        live.wait()
    artifacts.clean_stale_temp_dirs()
    assert not live_dir.exists()


def test_status_works_in_a_read_only_workdir(recipe_path, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "runs"
    run_recipe(load_recipe(recipe_path))
    (workdir / ".fingerprints.json").unlink()  # so that status has a cache to write
    shutil.copytree(workdir / "first", workdir / ".first.old")  # and a leftover it cannot remove
    real_write_text, real_rmtree = Path.write_text, shutil.rmtree

    def refuse_in_workdir(path, *args, **kwargs):  # what chmod does for a user who is not root
        if workdir in Path(path).parents:
            raise PermissionError(13, "Permission denied", str(path))
        return real_write_text(path, *args, **kwargs)

    def rmtree(path, ignore_errors=False, **kwargs):
        if workdir in Path(path).parents:
            if ignore_errors:
                return None
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(Path, "write_text", refuse_in_workdir)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    modes = {path: path.stat().st_mode for path in [workdir, *workdir.rglob("*")]}
    for path in sorted(modes, reverse=True):
        path.chmod(modes[path] & ~0o222)
    try:
        assert "2 up to date" in status_of_recipe(recipe_path, capsys)
        assert main(["status", str(workdir)]) == 0
        assert "incomplete" not in capsys.readouterr().out
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert not (workdir / ".fingerprints.json").exists()


@pytest.mark.parametrize("content, problem", [
    ('{"recipe": "x.yaml", "steps": ["fir', "not valid JSON"),
    ('["first", "second"]', "not a Distillery run record"),
    ('{"recipe": "x.yaml", "steps": ["../../etc"], "document": {}}', "`steps` is not a list of step names"),
    (b"\xff\xfe{}", "not UTF-8 text"),
])
def test_a_foreign_or_corrupt_recipe_json_is_exit_2_naming_it(recipe_path, tmp_path, capsys, content, problem):
    workdir = tmp_path / "runs"
    run_recipe(load_recipe(recipe_path))
    run_file = workdir / "recipe.json"
    run_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["status", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert f"{run_file}: {problem}" in err and "distill run" in err and "Traceback" not in err
    assert main(["report", str(workdir)]) == 2


@pytest.mark.parametrize("content, problem", [
    ('{"step": "second", "key": "0123456789abcdef", "status": "complete"}', "is step 'second''s, not 'first''s"),
    ('[1, 2, 3]', "is not a Distillery step manifest"),
])
def test_a_foreign_manifest_is_exit_2_naming_it(recipe_path, tmp_path, capsys, content, problem):
    workdir = tmp_path / "runs"
    run_recipe(load_recipe(recipe_path))
    manifest = workdir / "first" / "manifest.json"
    manifest.write_text(content)
    assert main(["status", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert f"{manifest} {problem}" in err and "move or remove" in err and "Traceback" not in err
    assert "will not replace it" in status_of_recipe(recipe_path, capsys)
    assert main(["run", str(recipe_path)]) == 2  # never replaced: it is not this step's output
    assert "refusing to replace it" in capsys.readouterr().err
    assert manifest.read_text() == content


FILTERED = """\
name: moved
workdir: runs
steps:
  problems: {uses: load, path: data/p.jsonl}
  clean: {uses: filter, input: problems, decontaminate: [arith_test]}
"""


def test_keys_name_files_by_content_not_where_they_live(tmp_path, monkeypatch, capsys):
    """A moved project (relative paths stay relative) and another checkout of the package (its benchmarks at
    another path) re-run nothing; the key records package data by its place in the package."""
    project = tmp_path / "a"
    (project / "data").mkdir(parents=True)
    (project / "data" / "p.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "problem": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                for i in range(5)))
    (project / "recipe.yaml").write_text(FILTERED)
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(REPO))
    outcomes = run_recipe(load_recipe(project / "recipe.yaml"))
    files = json.loads((project / "runs" / "clean" / "manifest.json").read_text())["inputs"]["files"]
    assert list(files) == ["distillery:eval/data/arith_test.jsonl"]
    assert list(json.loads((project / "runs" / "problems" / "manifest.json").read_text())["inputs"]["files"]) == \
        ["data/p.jsonl"]
    keys = {name: o.artifact.key for name, o in outcomes.items()}

    moved = tmp_path / "elsewhere" / "b"
    shutil.copytree(project, moved.parent / "b", symlinks=True)
    monkeypatch.chdir(moved)
    assert {s.name: (s.key, s.action) for s in plan(load_recipe(moved / "recipe.yaml"))} == \
        {name: (key, "skip") for name, key in keys.items()}

    # another checkout: the package's benchmarks (the same bytes) at another path
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "eval", checkout / "eval", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import json, sys; sys.path.insert(0, %r); import eval, pipeline.core.keys as k; "
            "from pipeline.core.recipe import load_recipe; assert eval.__file__.startswith(%r), eval.__file__; "
            "print(json.dumps({s.name: [s.key, s.reasons] for s in k.plan(load_recipe('recipe.yaml'))}))"
            % (str(checkout), str(checkout)))
    result = subprocess.run([sys.executable, "-c", code], cwd=moved, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {name: [key, []] for name, key in keys.items()}


def test_a_benchmark_recorded_by_absolute_path_says_so(tmp_path, monkeypatch):
    """A manifest from before package data was keyed by its place names the benchmark by its absolute path: the
    step re-runs once (its key changed), and says the content is the same."""
    project = tmp_path / "a"
    (project / "data").mkdir(parents=True)
    (project / "data" / "p.jsonl").write_text(json.dumps({"id": "1", "problem": "1 + 1?", "answer": "2"}) + "\n")
    (project / "recipe.yaml").write_text(FILTERED)
    monkeypatch.chdir(project)
    run_recipe(load_recipe(project / "recipe.yaml"))
    manifest_path = project / "runs" / "clean" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    digest = manifest["inputs"]["files"].pop("distillery:eval/data/arith_test.jsonl")
    manifest["inputs"]["files"]["/old/checkout/eval/data/arith_test.jsonl"] = digest
    manifest["key"] = "0000000000000000"
    manifest_path.write_text(json.dumps(manifest))
    reasons = {s.name: s.reasons for s in plan(load_recipe(project / "recipe.yaml"))}["clean"]
    assert reasons == ["input file distillery:eval/data/arith_test.jsonl was keyed by its path "
                       "/old/checkout/eval/data/arith_test.jsonl (same content; package data is now keyed by its "
                       "place in the package, wherever it is installed)"]
