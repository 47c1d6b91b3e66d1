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


def distill(*args):
    proc = subprocess.run([DISTILL, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_smoke_recipe_end_to_end_then_cached(tmp_path):
    workdir = tmp_path / "smoke"
    distill("run", "recipes/smoke.yaml", "-o", f"workdir={workdir}")

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
