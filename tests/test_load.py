"""The load step and the table readers of pipeline.text (tables, json_lines, json_tables, problems): formats, the
problems contract, and errors that name the file, line, column and row id (exit code 2 through the CLI, no
traceback)."""

import json
import re
import sys

import datasets
import pytest

from pipeline.commands.cli import main
from pipeline.core.artifacts import Output
from pipeline.core.errors import UserError
from pipeline.steps.load import Config, run
from pipeline.text import json_lines, json_tables, problems
from pipeline.text.tables import read_table

ROWS = [{"id": "a", "problem": "1+1?", "answer": 2, "level": 1},
        {"id": "b", "problem": "2+3?", "answer": "5", "level": 2}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
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


MALFORMED = [
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
]


@pytest.mark.parametrize("name, content, message", MALFORMED)
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


# --- at scale: streamed into a memory-mapped file, checked in Arrow; the same rows and errors as row by row -------

def problem(number, **extra):
    return {"id": f"p{number}", "problem": f"problem {number}: ünïcødé 数学 🧮 " + "x" * 60, "answer": str(number),
            **extra}


MANY = 20_000  # about 2.4 MB: several of pyarrow's 1 MiB blocks
SCALE_FILES = {  # each of these goes through the streaming reader, or falls back from it part way through
    "plain": lambda: [problem(i) for i in range(MANY)],
    "nulls_unicode_nested": lambda: [problem(i, note=None if i % 3 else "ß\u3000", meta={"k": [i, None], "s": "é"})
                                     for i in range(MANY)],
    "int_answers": lambda: [{**problem(i), "answer": i - 5} for i in range(MANY)],
    "new_key_at_the_end": lambda: [problem(i) for i in range(MANY)] + [problem(MANY, late="x")],
    "null_then_string": lambda: [problem(i, x=None) for i in range(MANY)] + [problem(MANY, x="s")],
    "int_then_float": lambda: [problem(i, x=i) for i in range(MANY)] + [problem(MANY, x=1.5)],
    "int_then_string": lambda: [{**problem(i), "answer": i} for i in range(MANY)] + [problem(MANY)],
    "dates_then_text": lambda: [problem(i, day="2024-01-02") for i in range(MANY)] + [problem(MANY, day="soon")],
    "struct_gains_a_field": lambda: [problem(i, m={"a": 1}) for i in range(MANY)] + [problem(MANY, m={"a": 1, "b": 2})],
    "key_missing_later": lambda: [problem(i, x=1) for i in range(MANY)] + [problem(MANY)],
}


@pytest.mark.parametrize("name", SCALE_FILES)
def test_streamed_tables_equal_the_row_by_row_reading(tmp_path, name):
    path = write_jsonl(tmp_path / f"{name}.jsonl", SCALE_FILES[name]())
    fast = read_table(str(path))
    rows, lines = json_lines.read_json_lines(path, str(path))  # json.loads, per row
    exact = json_tables._dataset_from_rows(rows, lines, str(path))
    assert fast.features == exact.features
    assert fast.to_list() == exact.to_list()


@pytest.mark.parametrize("last_lines, message", [
    ("null\n", f"line {MANY + 1}: a JSON null, not an object"),
    ('{"id": broken}\n' + json.dumps(problem(MANY)) + "\nnull\n", f"line {MANY + 3}: a JSON null"),  # first pass
    (json.dumps(problem(MANY)) * 2 + "\n", f"line {MANY + 1}: not valid JSON (Extra data"),  # two objects, one line
    ('{"id": broken}\n', f"line {MANY + 1}: not valid JSON"),
])
def test_bad_lines_far_into_a_large_file_are_named(tmp_path, last_lines, message):
    path = write_jsonl(tmp_path / "p.jsonl", SCALE_FILES["plain"]())
    path.write_text(path.read_text() + last_lines)
    with pytest.raises(UserError, match=re.escape(f"{path}: {message}")):
        read_table(str(path))


def test_large_files_are_memory_mapped_not_held(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", SCALE_FILES["plain"]())
    datasets.Dataset.from_list(SCALE_FILES["plain"]()).to_parquet(str(tmp_path / "p.parquet"))
    for name in ("p.jsonl", "p.parquet"):
        ds = read_table(str(tmp_path / name))
        assert ds.cache_files and len(ds) == MANY, name  # an Arrow file on disk, paged in as it is read
    assert load(tmp_path, path=str(path))["answer"][-1] == str(MANY - 1)


@pytest.mark.parametrize("rows, expected", [
    ([{"id": 1, "problem": "p", "answer": 2}, {"id": -3, "problem": "q", "answer": 10**18}],
     {"id": ["1", "-3"], "answer": ["2", "1000000000000000000"]}),
    ([{"id": f"p{i}", "problem": "p", "answer": a} for i, a in enumerate((1.5, 2.0, 1e20, -0.1))],
     {"answer": ["1.5", "2.0", "1e+20", "-0.1"]}),
    ([{"id": "a", "problem": "p", "answer": 2**70}, {"id": "b", "problem": "p", "answer": "x"}],
     {"answer": ["1180591620717411303424", "x"]}),
    # only numbers, one beyond 64 bits: pyarrow reads the column as floats (1.1805916207174113e+21); exact here
    ([{"id": "a", "problem": "p", "answer": 2**70}, {"id": "b", "problem": "p", "answer": 3}],
     {"answer": ["1180591620717411303424", "3"]}),
    ([{"id": "é", "problem": "數學 \u200b", "answer": "🧮", "note": None}, {"id": "b", "problem": "q", "answer": "1"}],
     {"id": ["é", "b"], "problem": ["數學 \u200b", "q"], "answer": ["🧮", "1"], "note": [None, None]}),
])
def test_ids_and_answers_become_the_strings_str_writes(tmp_path, rows, expected):
    ds = load(tmp_path, path=str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert {column: ds[column] for column in expected} == expected
    assert ds.features["id"].dtype == ds.features["answer"].dtype == "string"


def test_int_answers_over_several_blocks_become_strings(tmp_path):
    ds = load(tmp_path, path=str(write_jsonl(tmp_path / "p.jsonl", SCALE_FILES["int_answers"]())))
    assert ds["answer"] == [str(i - 5) for i in range(MANY)]


def test_arrow_whitespace_is_python_whitespace():
    """check_problems finds blank values with arrow's utf8_trim_whitespace: it must strip what str.strip() does."""
    import pyarrow as pa
    import pyarrow.compute as pc

    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]  # surrogates are not UTF-8
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(pa.array(chars))), 0).to_pylist()
    assert [c for c, is_blank in zip(chars, blank) if is_blank != c.isspace()] == []


@pytest.mark.parametrize("rows, message", [
    ([{"id": "a", "problem": "\u3000\x1c \u2028", "answer": "1"}], "line 1, row 0 (id 'a'): empty 'problem'"),
    ([{"id": "a", "problem": "p", "answer": "1"}] * 3 + [{"id": "b", "problem": "p", "answer": " "},
                                                         {"id": "c", "problem": "", "answer": "1"}],
     "line 4, row 3 (id 'b'): empty 'answer'"),  # the first empty value in row order, across batches
    ([{"id": f"r{i}", "problem": "p", "answer": "1"} for i in range(5)] + [{"id": "x", "problem": None, "answer": ""}],
     "line 6, row 5 (id 'x'): empty 'problem'"),  # in one row: the first in `require` order
    ([{"id": f"r{i}", "problem": "p", "answer": "1"} for i in range(5)] + [{"id": "r1", "problem": "p", "answer": "1"}],
     "line 6, row 5: duplicate id 'r1'"),
    ([{"id": "a", "problem": "p", "answer": {"k": 1}}, {"id": "b", "problem": "p", "answer": " \t"}],
     "line 2, row 1 (id 'b'): empty 'answer'"),  # a Json column, decoded
])
def test_problems_check_finds_the_first_bad_row_across_batches(tmp_path, monkeypatch, rows, message):
    monkeypatch.setattr(problems, "CHECK_BATCH_ROWS", 2)
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError) as err:
        problems.check_problems(read_table(str(path)), str(path), ["id", "problem", "answer"])
    assert f"bad.jsonl: {message}" in str(err.value)


def test_problems_check_keeps_id_types(tmp_path):
    ints = read_table(str(write_jsonl(tmp_path / "i.jsonl", [{"id": 7, "problem": "p", "answer": "1"}] * 2)))
    with pytest.raises(UserError, match=r"row 1: duplicate id 7$"):
        problems.check_problems(ints, "i.jsonl", ["id", "problem", "answer"])
    floats = read_table(str(write_jsonl(tmp_path / "f.jsonl", [{"id": 1.5, "problem": "p", "answer": "1"},
                                                                {"id": float("nan"), "problem": "p", "answer": "1"},
                                                                {"id": float("nan"), "problem": "p", "answer": "1"}])))
    # An id must be a string or an integer: 1.5 would become the id "1.5", NaN or Infinity "nan" / "inf".
    with pytest.raises(UserError, match=r"row 0: id 1.5 is not a string or an integer"):
        problems.check_problems(floats, "f.jsonl", ["id", "problem", "answer"])
    problems.check_problems(floats, "f.jsonl", ["problem", "answer"])  # ids are checked only when required
    problems.check_problems(ints, "i.jsonl", ["problem", "answer"])  # ids are checked only when required


@pytest.mark.parametrize("name, content, message", [case for case in MALFORMED if case[0].endswith(".jsonl")])
def test_malformed_lines_are_named_whatever_the_pieces_of_the_first_pass(tmp_path, monkeypatch, name, content, message):
    monkeypatch.setattr(json_lines, "PRESCAN_BYTES", 7)  # every line crosses a piece's end
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8", "surrogatepass").replace(b"\xc3\xa9", b"\xe9"))
    with pytest.raises(UserError, match=re.escape(str(path))) as err:
        read_table(str(path))
    assert message in str(err.value)


@pytest.mark.parametrize("content, rows, longest", [
    (b'{"a": 1}\n{"a": 22}\n', 2, 10),
    (b'{"a": 1}\r\n\r\n  {"a": 2}  \r\n\t\n{"a": 3}', 3, 14),  # CRLF, padding, blank lines, no newline at the end
    (b'\xef\xbb\xbf{"a": 1}\n' + b'{"a": "' + b"y" * 300 + b'"}\n', 2, 310),  # byte order mark; a long line
    (b'\n\n{"a": "\xc3\xa9"}\n\n', 1, 12),
])
def test_first_pass_counts_rows_and_the_longest_line(tmp_path, monkeypatch, content, rows, longest):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    for piece in (8 << 20, 16, 1):
        monkeypatch.setattr(json_lines, "PRESCAN_BYTES", piece)
        assert json_lines.prescan(path, "p.jsonl") == (rows, longest), piece
