"""`distill export`: a finished dataset step as jsonl, parquet or LLaMA-Factory ShareGPT, through the real CLI."""

import json

import datasets
import pytest

from pipeline.commands.cli import main
from pipeline.core.artifacts import COMPLETE, write_json_atomic

SFT = [{"id": "a", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                                {"role": "assistant", "content": "\\boxed{2}"}]}]
PAIRS = [{"id": "a", "prompt": [{"role": "user", "content": "1+1?"}],
          "chosen": [{"role": "assistant", "content": "\\boxed{2}"}],
          "rejected": [{"role": "assistant", "content": "\\boxed{3}"}]}]


def step_dir(tmp_path, name, rows, complete=True):
    path = tmp_path / name
    datasets.Dataset.from_list(rows).save_to_disk(str(path / "data"))
    write_json_atomic(path / "manifest.json", {"step": name, "produces": "dataset", "key": "k",
                                               "status": COMPLETE if complete else "running", "stats": {}})
    return path


def test_jsonl_parquet_and_sharegpt_of_sft_data(tmp_path):
    sft = step_dir(tmp_path, "sft_data", SFT)
    assert main(["export", str(sft), "--format", "jsonl", "--out", str(tmp_path / "o.jsonl")]) == 0
    assert [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()] == SFT
    assert main(["export", str(sft), "--format", "parquet", "--out", str(tmp_path / "o.parquet")]) == 0
    assert datasets.Dataset.from_parquet(str(tmp_path / "o.parquet")).to_list() == SFT
    assert main(["export", str(sft), "--format", "sharegpt", "--out", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text()) == [{"id": "a", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "1+1?"},
        {"from": "gpt", "value": "\\boxed{2}"}]}]


def test_sharegpt_of_pairs(tmp_path):
    assert main(["export", str(step_dir(tmp_path, "pairs", PAIRS)), "--format", "sharegpt",
                 "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text()) == [{
        "id": "a", "conversations": [{"from": "human", "value": "1+1?"}],
        "chosen": {"from": "gpt", "value": "\\boxed{2}"}, "rejected": {"from": "gpt", "value": "\\boxed{3}"}}]


@pytest.mark.parametrize("case", ["incomplete", "no_messages"])
def test_bad_input_exits_2_with_a_reason(tmp_path, capsys, case):
    if case == "incomplete":
        path, message = step_dir(tmp_path, "s", SFT, complete=False), "not a complete step dir"
    else:
        path, message = step_dir(tmp_path, "s", [{"id": "a", "problem": "1+1?"}]), "needs a `messages` column"
    assert main(["export", str(path), "--format", "sharegpt", "--out", str(tmp_path / "x.json")]) == 2
    assert message in capsys.readouterr().err
