"""Two fresh runs of recipes/smoke.yaml on the same machine and versions: which outputs are bit-identical.

Slow (two full smoke runs); `make test-all` runs it. docs/reproducibility.md's determinism table quotes what it found.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DISTILL = str(Path(sys.executable).with_name("distill"))
DATASET_STEPS = ("problems", "samples", "graded", "sft_data", "pairs")
MODEL_STEPS = ("sft", "merged", "redi", "redi_merged")


def digest(directory: Path, pattern: str) -> str:
    sha = hashlib.sha256()
    for path in sorted(directory.glob(pattern)):
        sha.update(path.name.encode() + path.read_bytes())
    return sha.hexdigest()


def run_smoke(workdir: Path) -> None:
    proc = subprocess.run([DISTILL, "run", "recipes/smoke.yaml", "-o", f"workdir={workdir}"], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_fresh_smoke_runs_give_identical_datasets_models_and_scores(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_smoke(first)
    run_smoke(second)
    for step in DATASET_STEPS:
        assert digest(first / step / "data", "*.arrow") == digest(second / step / "data", "*.arrow"), step
    for step in MODEL_STEPS:
        assert digest(first / step / "model", "*.safetensors") == digest(second / step / "model", "*.safetensors"), step
    scores = [json.loads((workdir / "report" / "results.json").read_text())["models"] for workdir in (first, second)]
    assert scores[0] == scores[1]
    keys = [{p.parent.name: json.loads(p.read_text())["key"] for p in w.glob("*/manifest.json")} for w in (first, second)]
    assert keys[0] == keys[1]
