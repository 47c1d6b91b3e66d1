"""The load step: formats, the problems contract, and errors that name the file, column and row id."""

import json

import datasets
import pytest

from pipeline.artifacts import Output
from pipeline.errors import UserError
from pipeline.steps.load import Config, run

ROWS = [{"id": "a", "problem": "1+1?", "answer": 2, "level": 1},
        {"id": "b", "problem": "2+3?", "answer": "5", "level": 2}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(tmp_path, **settings):
    out = Output(name="problems", kind="dataset", dir=tmp_path / "out", scratch=tmp_path / "s", seed=0)
    return run(Config(uses="load", **settings), {}, out).dataset()


def test_jsonl_passes_columns_through_and_answers_become_strings(tmp_path):
    ds = load(tmp_path, path=str(write_jsonl(tmp_path / "p.jsonl", ROWS)))
    assert ds["answer"] == ["2", "5"] and ds["level"] == [1, 2] and ds.features["answer"].dtype == "string"


def test_parquet_arrow_dir_rename_and_limit(tmp_path):
    table = datasets.Dataset.from_list([{"qid": r["id"], "question": r["problem"], "answer": str(r["answer"])}
                                        for r in ROWS])
    table.to_parquet(str(tmp_path / "p.parquet"))
    table.save_to_disk(str(tmp_path / "arrow"))
    rename = {"qid": "id", "question": "problem"}
    assert load(tmp_path, path=str(tmp_path / "p.parquet"), columns=rename)["problem"] == ["1+1?", "2+3?"]
    assert load(tmp_path, path=str(tmp_path / "arrow"), columns=rename, limit=1)["id"] == ["a"]


@pytest.mark.parametrize("rows, message", [
    ([{"id": "a", "problem": "x"}], "missing column(s) ['answer']"),
    ([ROWS[0], {"id": "b", "problem": "  ", "answer": "1"}], "row 1 (id 'b'): empty 'problem'"),
    ([ROWS[0], {"id": "a", "problem": "y", "answer": "1"}], "row 1: duplicate id 'a'"),
    ([{"id": "", "problem": "y", "answer": "1"}], "empty 'id'"),
])
def test_bad_rows_are_refused_by_name(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match="bad.jsonl") as err:
        load(tmp_path, path=str(path))
    assert message in str(err.value)


def test_repeated_ids_allowed_for_completions(tmp_path):
    rows = [{"id": "a", "problem": "1+1?", "answer": "2", "completion": c} for c in ("\\boxed{2}", "3")]
    ds = load(tmp_path, path=str(write_jsonl(tmp_path / "c.jsonl", rows)), unique_ids=False)
    assert ds["completion"] == ["\\boxed{2}", "3"]


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        Config(uses="load", path=str(tmp_path / "nope.jsonl"))
