"""Strict data input (issue 24): a problem or answer that is not a string or a number, `columns` that rename two
columns onto one name, a data path that is a FIFO, a socket or empty, and `distill check` on an sft step whose input
lacks `messages` are refused with exit code 2 and a message naming the file and the row or key: never a traceback,
a hang or a silently wrong row."""

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from pipeline.commands.cli import main
from pipeline.core.errors import UserError
from pipeline.core.fingerprints import Fingerprints
from pipeline.text import problems
from pipeline.text.tables import read_table

QWEN3_TEMPLATE = Path(__file__).parent / "fixtures" / "templates" / "qwen3.jinja"
GOOD = {"id": "a", "problem": "What is 2 + 3?", "answer": "5"}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path))
    return path


def recipe(tmp_path, load: dict, **more_steps) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"name": "strict", "seed": 0, "workdir": str(tmp_path / "work"),
                                "steps": {"data": {"uses": "load", **load}, **more_steps}}))
    return str(path)


def refused(capsys, argv) -> str:
    """Run the CLI in-process; it must exit 2 without a traceback. Its error output, on one line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # messages on one line


# --- problem and answer: strings or numbers -------------------------------------------------------------------------

@pytest.mark.parametrize("row, message", [
    ({"id": "b", "problem": {"text": "What is 1 + 1?"}, "answer": "2"},
     "line 2, row 1 (id 'b'): 'problem' is an object ({\"text\": \"What is 1 + 1?\"}); a problem must be a string"),
    ({"id": "b", "problem": ["What is", "1 + 1?"], "answer": "2"},
     "line 2, row 1 (id 'b'): 'problem' is a list ([\"What is\", \"1 + 1?\"]); a problem must be a string"),
    ({"id": "b", "problem": "p", "answer": {"value": 5}},
     "line 2, row 1 (id 'b'): 'answer' is an object ({\"value\": 5}); an answer must be a string"),
    # among strings: json.dumps would have made them the strings "NaN" and "Infinity"; refused while reading
    ('{"id": "b", "problem": "p", "answer": NaN}',
     "line 2 (id 'b'): column 'answer': NaN in a column of other types cannot be stored"),
    ('{"id": "b", "problem": "p", "answer": Infinity}', "line 2 (id 'b'): column 'answer': Infinity in a column"),
    # among strings: a Json column (not the string "true"), refused by the problems check
    ({"id": "b", "problem": "p", "answer": True},
     "line 2, row 1 (id 'b'): 'answer' is a boolean; an answer must be a string or a number"),
])
def test_jsonl_problem_and_answer_must_be_strings_or_numbers(tmp_path, capsys, row, message):
    data = write_jsonl(tmp_path / "problems.jsonl", [GOOD, row])
    err = refused(capsys, ["run", recipe(tmp_path, {"path": str(data)})])
    assert f"{data}: {message}" in err
    assert not (tmp_path / "work" / "data").exists()


@pytest.mark.parametrize("rows, message", [
    # a whole column of one kind: refused by check_problems on Arrow columns
    ([{"id": "a", "problem": "p", "answer": 1.5}, '{"id": "b", "problem": "p", "answer": NaN}'],
     "line 2, row 1 (id 'b'): 'answer' is NaN; an answer must be a string or a number"),
    ([{"id": "a", "problem": "p", "answer": 1.5}, '{"id": "b", "problem": "p", "answer": -Infinity}'],
     "line 2, row 1 (id 'b'): 'answer' is -Infinity; an answer must be a string or a number"),
    ([{"id": "a", "problem": "p", "answer": False}, {"id": "b", "problem": "p", "answer": True}],
     "line 1, row 0 (id 'a'): 'answer' is a boolean; an answer must be a string or a number"),
    ([{"id": "a", "problem": "p", "answer": {"v": 1}}, {"id": "b", "problem": "p", "answer": {"v": 2}}],
     "line 1, row 0 (id 'a'): 'answer' is an object ({\"v\": 1})"),
    ([GOOD, {"id": "b", "problem": "p", "answer": "1"}, {"id": "c", "problem": "p", "answer": True}],
     "line 3, row 2 (id 'c'): 'answer' is a boolean"),  # among strings: a Json column, not the string "true"
])
def test_jsonl_answers_of_one_kind_are_refused_with_their_row(tmp_path, capsys, rows, message):
    data = write_jsonl(tmp_path / "problems.jsonl", rows)
    err = refused(capsys, ["run", recipe(tmp_path, {"path": str(data)})])
    assert f"{data}: {message}" in err


@pytest.mark.parametrize("answers, message", [
    ([1.5, float("nan")], "row 1 (id 'b'): 'answer' is NaN"),
    ([float("inf"), 2.0], "row 0 (id 'a'): 'answer' is Infinity"),
    ([True, False], "row 0 (id 'a'): 'answer' is a boolean"),
    ([{"value": 5}, {"value": 6}], "row 0 (id 'a'): 'answer' is an object ({\"value\": 5})"),
    ([["5"], ["6"]], "row 0 (id 'a'): 'answer' is a list ([\"5\"])"),
])
def test_parquet_answers_that_are_not_strings_or_numbers_are_refused(tmp_path, capsys, answers, message):
    data = write_parquet(tmp_path / "problems.parquet", {"id": ["a", "b"], "problem": ["p", "q"], "answer": answers})
    err = refused(capsys, ["run", recipe(tmp_path, {"path": str(data)})])
    assert f"{data}: {message}" in err


def test_parquet_problem_that_is_an_object_is_refused(tmp_path, capsys):
    data = write_parquet(tmp_path / "problems.parquet",
                         {"id": ["a", "b"], "problem": [None, {"text": "q"}], "answer": ["1", "2"]})
    err = refused(capsys, ["run", recipe(tmp_path, {"path": str(data), "require": ["id", "answer"]})])
    assert f"{data}: row 1 (id 'b'): 'problem' is an object" in err  # checked even when not required


def test_first_bad_value_is_found_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(problems, "CHECK_BATCH_ROWS", 2)
    rows = [{"id": f"r{i}", "problem": "p", "answer": 1.5} for i in range(5)] + ['{"id": "x", "problem": "p", '
                                                                                  '"answer": NaN}']
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(UserError, match=r"line 6, row 5 \(id 'x'\): 'answer' is NaN"):
        problems.check_problems(read_table(data), str(data), ["id", "problem", "answer"])


def test_numbers_still_load_as_strings_and_benchmarks_still_load(tmp_path, capsys):
    data = write_jsonl(tmp_path / "problems.jsonl", [{"id": 1, "problem": 12, "answer": 15},
                                                     {"id": 2, "problem": "q", "answer": 7}])
    assert main(["run", recipe(tmp_path, {"path": str(data)})]) == 0
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "work" / "data" / "data"))
    assert ds["answer"] == ["15", "7"] and ds["id"] == ["1", "2"]
    from eval.benchmarks import BENCHMARK_DIR

    for path in sorted(BENCHMARK_DIR.glob("*.jsonl")):
        problems.check_problems(read_table(path), str(path), ["id", "problem", "answer"])


@pytest.mark.parametrize("number", [2 ** 64, -2 ** 63 - 1, 10 ** 30])
def test_integer_beyond_64_bits_loads_as_a_string_alone_and_is_refused_inside_a_list(tmp_path, number):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"id": "p1", "a": number}) + "\n" + json.dumps({"id": "p2", "a": 3}) + "\n")
    assert read_table(path)["a"] == [str(number), "3"]  # lossless: the digits, not a rounded float
    path.write_text(json.dumps({"id": "p1", "a": [1]}) + "\n" + json.dumps({"id": "p2", "a": [number]}) + "\n")
    with pytest.raises(UserError, match=rf"line 2 \(id 'p2'\): column 'a': cannot store \[{number}\]"):
        read_table(path)


# --- columns: one source per name ----------------------------------------------------------------------------------

@pytest.mark.parametrize("first_line", [b"\xef\xbb\xbf\n", b"\n", b"\xef\xbb\xbf  \r\n"])
def test_two_objects_on_a_line_after_a_blank_first_line_are_refused_naming_it(tmp_path, first_line):
    # the long hostile profile found it: a byte order mark alone on line 1 was counted as a row, so the two rows
    # pyarrow reads from line 2 matched the count and loaded
    path = tmp_path / "data.jsonl"
    path.write_bytes(first_line + b'{"a": 1} {"a": 2}')
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        read_table(path)


def test_columns_renaming_onto_an_existing_column_is_refused(tmp_path, capsys):
    data = write_jsonl(tmp_path / "problems.jsonl", [{"id": "a", "question": "q", "problem": "p", "answer": "1"}])
    err = refused(capsys, ["run", recipe(tmp_path, {"path": str(data), "columns": {"question": "problem"}})])
    assert f"{data}: `columns: {{question: problem}}` renames 'question' onto the file's own column 'problem'" in err
    # renaming the file's own column away as well is a swap, and loads
    assert main(["run", recipe(tmp_path, {"path": str(data),
                                          "columns": {"question": "problem", "problem": "old_problem"}})]) == 0


def test_columns_renaming_two_sources_onto_one_name_is_refused(tmp_path, capsys):
    data = write_jsonl(tmp_path / "problems.jsonl", [{"id": "a", "question": "q", "prompt": "p", "answer": "1"}])
    err = refused(capsys, ["run", recipe(tmp_path, {"path": str(data),
                                                    "columns": {"question": "problem", "prompt": "problem"}})])
    assert "steps.data.columns" in err and "'question' and 'prompt' are each renamed to 'problem'" in err


# --- special and empty paths ---------------------------------------------------------------------------------------

def run_with_time_limit(argv, seconds=20):
    """main(argv), failing the test instead of hanging when it blocks (opening a FIFO for reading does)."""
    def alarm(signum, frame):
        raise TimeoutError(f"blocked for {seconds}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fifo_data_path_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "problems.jsonl"
    os.mkfifo(fifo)
    assert run_with_time_limit(["run", recipe(tmp_path, {"path": str(fifo)})]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{fifo}: is a named pipe (FIFO), not a regular file or directory" in err and "Traceback" not in err
    for read in (read_table, Fingerprints().of):  # each refuses it on its own, before opening it
        with pytest.raises(UserError, match="named pipe"):
            read(fifo)


def test_socket_data_path_is_refused(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    if len(str(path)) > 100:  # AF_UNIX paths are short
        pytest.skip("tmp path too long for a unix socket")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        err = refused(capsys, ["run", recipe(tmp_path, {"path": str(path)})])
        assert f"{path}: is a socket, not a regular file or directory" in err
        with pytest.raises(UserError, match="is a socket"):
            read_table(path)
    finally:
        server.close()


def test_device_path_is_refused_by_read_table_and_fingerprints():
    for read in (read_table, Fingerprints().of):
        with pytest.raises(UserError, match="/dev/null: is a character device"):
            read("/dev/null")


def test_empty_path_is_refused_before_anything_is_hashed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hashed = []
    monkeypatch.setattr(Fingerprints, "_file", lambda self, path: hashed.append(path) or "0")
    err = refused(capsys, ["run", recipe(tmp_path, {"path": ""})])
    assert "steps.data.path" in err and "empty path" in err
    assert hashed == []
    for read in (read_table, Fingerprints().of):
        with pytest.raises(UserError, match="empty path"):
            read("")


# --- distill check: the same refusal as distill run -----------------------------------------------------------------

def test_check_on_sft_without_messages_exits_2_as_run_does(tmp_path, capsys):
    data = write_jsonl(tmp_path / "problems.jsonl", [GOOD])
    path = recipe(tmp_path, {"path": str(data)},
                  sft={"uses": "sft", "input": "data", "model": "builtin:tiny-random", "max_steps": 1,
                       "chat_template": str(QWEN3_TEMPLATE), "max_length": 128})
    assert main(["run", path, "--until", "data"]) == 0
    capsys.readouterr()
    lacks = "sft: dataset of step 'data' lacks column(s) messages (it has id, problem, answer)"
    assert main(["check", path]) == 2
    captured = capsys.readouterr()
    assert lacks in " ".join(captured.out.split()) and "Traceback" not in captured.err
    assert "the chat-template check failed for sft" in captured.err
    assert lacks in refused(capsys, ["run", path])
