"""The load step and pipeline.tables: formats, the problems contract, and errors that name the file, line, column
and row id (exit code 2 through the CLI, no traceback)."""

import json
import re

import datasets
import pytest

from pipeline.artifacts import Output
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.steps.load import Config, run
from pipeline.tables import read_table

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


# --- malformed files: UserError naming the file and the line, never a datasets traceback ------------------------

GOOD = '{"id": "a", "problem": "1+1?", "answer": "2"}\n'


@pytest.mark.parametrize("name, content, message", [
    ("broken.jsonl", GOOD + '{"id": "b", "problem": \n', "line 2: not valid JSON"),
    ("trailing.jsonl", GOOD + GOOD.strip() + " extra\n", "line 2: not valid JSON (Extra data"),
    ("two.jsonl", GOOD + GOOD.strip() + GOOD, "line 2: not valid JSON (Extra data"),
    ("list.jsonl", GOOD + "[1, 2]\n", "line 2: a JSON list, not an object"),
    ("null.jsonl", GOOD + "\nnull\n", "line 3: a JSON null, not an object"),  # pyarrow's reader crashes on it
    ("number.jsonl", "3\n", "line 1: a JSON number, not an object"),
    ("string.jsonl", GOOD + '"text"\n', "line 2: a JSON string, not an object"),
    ("latin1.jsonl", GOOD + GOOD + '{"id": "caf\xe9"}\n', "line 3: not UTF-8 (byte 0xe9 at column 12)"),
    ("control.jsonl", '{"id": "a\x01"}\n', "line 1: not valid JSON (Invalid control character at column 10)"),
    ("surrogate.jsonl", GOOD + '{"id": "b\\ud800", "problem": "p", "answer": "1"}\n', "line 2 (id 'b\\ud800')"),
    ("empty.jsonl", "", "empty file (no rows)"),
    ("blank.jsonl", "\n  \n", "empty file (no rows)"),
    ("pretty.json", '{\n  "id": "a"\n}\n', "line 1: not valid JSON"),
    ("strings.json", '["a", "b"]', "item 0 of the list is a JSON string, not an object"),
    ("items.json", '[{"id": "a"},\n 3]', "item 1 of the list is a JSON number"),
    ("broken.json", '[{"id": "a"},\n {"id": }]', "line 2: not valid JSON"),
    ("latin1.json", '[{"id": "a"},\n {"id": "caf\xe9"}]', "line 2: not UTF-8"),
    ("empty.json", "[]", "empty list (no rows)"),
    ("wrapped.json", '{"data": [{"id": "a", "problem": "p", "answer": "1"}]}', "'data' is a list of objects"),
    ("table.csv", "id,problem,answer\n", "unsupported file type '.csv'"),
])
def test_malformed_json_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8", "surrogatepass").replace(b"\xc3\xa9", b"\xe9"))
    with pytest.raises(UserError, match=re.escape(str(path))) as err:
        read_table(str(path))
    assert message in str(err.value)


def test_corrupt_binary_files_and_dirs_are_user_errors(tmp_path):
    table = datasets.Dataset.from_list([{"id": "a", "problem": "p", "answer": "1"}])
    table.to_parquet(str(tmp_path / "good.parquet"))
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "good.parquet").read_bytes()[:40])
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all" * 10)
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "dir.jsonl").mkdir()
    table.save_to_disk(str(tmp_path / "step" / "data"))
    (tmp_path / "step" / "manifest.json").write_text("{}")
    cases = {"cut.parquet": "not a readable parquet file", "junk.arrow": "not a readable Arrow",
             "plain_dir": "is a directory but not a dataset saved by datasets.save_to_disk",
             "dir.jsonl": "is a directory, not a .jsonl file", "step": "a step's dataset is in"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=re.escape(str(tmp_path / name))) as err:
            read_table(str(tmp_path / name))
        assert message in str(err.value), name
    assert read_table(str(tmp_path / "step" / "data"))["id"] == ["a"]


def test_types_stay_exact(tmp_path):
    rows = [{"id": 1, "problem": "p", "answer": "007", "date": "2024-01-01", "meta": {"k": 1}},
            {"id": "x2", "problem": "q", "answer": 12, "date": "2024-01-02", "meta": "free text"},
            {"id": 3, "problem": "r", "answer": 1180591620717411303424, "date": None, "meta": None, "new": True}]
    ds = read_table(str(write_jsonl(tmp_path / "mixed.jsonl", rows)))
    assert ds["id"] == ["1", "x2", "3"]  # strings mixed with numbers: the column becomes strings, exactly
    assert ds["answer"] == ["007", "12", "1180591620717411303424"]  # no int64 overflow, no lost zeros
    assert ds["date"] == ["2024-01-01", "2024-01-02", None]  # not timestamps
    assert ds["meta"] == [{"k": 1}, "free text", None]  # an object and a string: datasets' Json feature
    assert ds["new"] == [None, None, True]  # a key that only a later row has
    dates = read_table(str(write_jsonl(tmp_path / "dates.jsonl", [{"id": "2024-01-01", "m": {"d": "2020-02-02"}}])))
    assert dates[0] == {"id": "2024-01-01", "m": {"d": "2020-02-02"}}


def test_bom_crlf_and_blank_lines_are_fine_and_bad_rows_name_their_line(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n\r\n".join(json.dumps(r).encode() for r in ROWS) + b"\r\n")
    assert read_table(str(path))["id"] == ["a", "b"]
    path = tmp_path / "gap.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"id": "b", "problem": "", "answer": "1"}) + "\n")
    with pytest.raises(UserError, match=r"gap.jsonl: line 3, row 1 \(id 'b'\): empty 'problem'"):
        load(tmp_path, path=str(path))


RECIPE = """\
name: badload
workdir: {workdir}
steps:
  problems: {{uses: load, path: {path}}}
  graded: {{uses: verify, input: problems}}
"""


@pytest.mark.parametrize("content, message", [
    (GOOD + '{"id": "b", broken\n', "line 2: not valid JSON"),
    (GOOD + '{"id": "\xe9"}\n', "line 2: not UTF-8"),
    (GOOD + "null\n", "line 2: a JSON null, not an object"),
    (GOOD + GOOD, "line 2, row 1: duplicate id 'a'"),
])
def test_cli_run_exits_2_naming_the_file_and_line(tmp_path, capsys, content, message):
    data = tmp_path / "problems.jsonl"
    data.write_bytes(content.encode().replace(b"\xc3\xa9", b"\xe9"))
    recipe = tmp_path / "badload.yaml"
    recipe.write_text(RECIPE.format(workdir=tmp_path / "runs", path=data))
    assert main(["run", str(recipe)]) == 2
    captured = capsys.readouterr()
    assert f"{data}: {message}" in captured.err
    assert "Traceback" not in captured.out + captured.err
