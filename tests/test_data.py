"""The committed data: arithmetic files equal their generator's output, SOURCES.md checksums hold, and every
benchmark gold grades."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eval.answers import grade
from eval.benchmarks import BENCHMARKS, load_benchmark
from pipeline.core.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
BENCHMARK_DATA = REPO / "eval" / "data"  # package data: the benchmarks ship in the wheel


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_openr1_raw_fixture_is_its_generators_output(tmp_path):
    subprocess.run([sys.executable, str(DATA / "make_openr1_raw.py"), "--out-dir", str(tmp_path)], check=True)
    committed = DATA / "fixtures" / "openr1-math-raw"
    for relative in ("README.md", "data/train-00000-of-00001.parquet"):
        assert (committed / relative).read_bytes() == (tmp_path / relative).read_bytes(), "rerun data/make_openr1_raw.py"


def test_arithmetic_files_are_the_generators_output_and_disjoint(tmp_path):
    subprocess.run([sys.executable, str(DATA / "make_arithmetic.py"), "--out-dir", str(tmp_path)], check=True)
    # --out-dir DIR writes DIR/train/arith_train.jsonl and DIR/benchmarks/arith_test.jsonl
    committed = {"train/arith_train.jsonl": DATA / "train/arith_train.jsonl",
                 "benchmarks/arith_test.jsonl": BENCHMARK_DATA / "arith_test.jsonl"}
    for relative, path in committed.items():
        assert path.read_bytes() == (tmp_path / relative).read_bytes(), "rerun data/make_arithmetic.py"
    train, test = read_jsonl(committed["train/arith_train.jsonl"]), read_jsonl(committed["benchmarks/arith_test.jsonl"])
    assert (len(train), len(test)) == (2000, 200)

    def triple(row):
        return tuple(row["problem"].removeprefix("What is ").removesuffix("?").split())

    assert not {triple(r) for r in train} & {triple(r) for r in test}
    for row in train + test:
        a, op, b = triple(row)
        assert 2 <= int(a) <= 30 and 2 <= int(b) <= 30
        assert row["answer"] == str(eval(f"{a} {op} {b}"))  # noqa: S307 - two small ints and an operator


def test_sources_md_lists_every_data_file_with_its_checksum_and_rows():
    table = re.findall(r"^\| ((?:eval/data|data/train)/\S+\.jsonl) \| (\d+) \| ([0-9a-f]{64}) \|",
                       (DATA / "SOURCES.md").read_text(), flags=re.M)
    listed = {path for path, _, _ in table}
    on_disk = {str(p.relative_to(REPO)) for p in [*BENCHMARK_DATA.glob("*.jsonl"), *(DATA / "train").glob("*.jsonl")]}
    assert listed == on_disk
    assert {str(b.path.relative_to(REPO)) for b in BENCHMARKS.values()} <= listed
    for path, rows, sha256 in table:
        data = (REPO / path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha256, path
        assert data.count(b"\n") == int(rows), path


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_gold_parses_and_a_boxed_copy_of_it_is_correct(name):
    benchmark, rows = load_benchmark(name)
    assert rows and len({r["id"] for r in rows}) == len(rows)
    labels = [grade(f"So \\boxed{{{r['answer']}}}.", r["answer"], gold_is_latex=benchmark.gold_is_latex).label
              for r in rows]
    wrong = [(r["id"], r["answer"], label) for r, label in zip(rows, labels) if label != "correct"]
    assert not wrong


def test_benchmark_specs():
    assert len(load_benchmark("aime24:5")[1]) == 5
    assert len(load_benchmark("aime24:5", limit=3)[1]) == 3
    benchmark, rows = load_benchmark(str(DATA / "train/arith_train.jsonl") + ":4")
    assert benchmark.name == "arith_train" and [r["id"] for r in rows] == [f"arith-train-{i:04d}" for i in range(4)]
    with pytest.raises(UserError, match="known benchmarks: aime24"):
        load_benchmark("aime2024")
    with pytest.raises(UserError, match="not found"):
        load_benchmark("no/such/file.jsonl")
