"""JSON and JSONL text checked the way a reader that names the line needs it: before pyarrow parses a file, and
instead of it where pyarrow refuses.

- `prescan`: each line of a JSONL file (or of a .json that is not one array) is checked for strict UTF-8 and for
  being one object (`{...}`), in numpy over PRESCAN_BYTES pieces (line by line in Python only in a piece with
  something to report); an object key that is empty or holds a NUL (which a table cannot hold) is reported too.
- `read_json_lines`, the slow path: the rows read line by line with `json.loads`, so a broken line, a line that is
  not an object or bytes that are not UTF-8 are reported with their line number. Blank lines are skipped.
- `read_json_array`: a .json holding one array of objects; each item must be an object (reported by item index).
- `number_texts`: a column's numbers as the file writes them; `where_in_file`: a row's line, for a message.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.text.arrow_tables import bad_key_message, unusable_key


def prescan(p: Path, name: str) -> tuple[int, int]:
    """(non-blank lines, longest line); UserError at the first line that is not UTF-8 or not a JSON object."""
    count = longest = lines_before = 0
    bad_key = None  # the first line with an empty or NUL key: reported once no line is broken (the slow reader)
    for chunk in _chunks_of_lines(p):
        summary = _summary_if_plain(chunk)
        if summary is not None:
            count, longest = count + summary[0], max(longest, summary[1])
        else:  # something to report, or a byte order mark: line by line, to name the line
            for number, raw in enumerate(io.BytesIO(chunk), lines_before + 1):
                line = raw.strip()
                if not line:
                    continue
                if number == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte order mark
                    if not line:  # a mark alone on a blank first line: no row (counted, two objects on one line
                        continue  # later would pass the row-count check)
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    _parse_line(p, name, number, raw)  # raises, naming the byte and column
                if line[:1] != b"{" or line[-1:] != b"}":
                    _parse_line(p, name, number, raw)  # raises: not JSON or not an object (else it is one; go on)
                count += 1
                longest = max(longest, len(raw))
        if bad_key is None and _may_have_bad_key(chunk):
            for number, raw in enumerate(io.BytesIO(chunk), lines_before + 1):
                try:
                    row = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
                except ValueError:
                    continue  # reported by the readers below, with its line
                if (bad := unusable_key(row)) is not None:
                    bad_key = f"{name}: line {number}: {bad_key_message(bad)}"
                    break
        lines_before += chunk.count(b"\n") + (not chunk.endswith(b"\n"))
    if not count:
        raise UserError(f"{name}: empty file (no rows)")
    if bad_key is not None:
        read_json_lines(p, name)  # a line that is not JSON is reported first, wherever it is
        raise UserError(bad_key)
    return count, longest


PRESCAN_BYTES = 8 << 20


_BAD_KEY_BYTES = re.compile(rb'""\s*:|\\u0000|\x00')


def _may_have_bad_key(chunk: bytes) -> bool:
    """Whether `chunk` may hold an object key that is empty or holds a NUL (`"":`, `\\u0000`, a raw NUL): one regex
    search in C; only then are its lines parsed in Python."""
    return _BAD_KEY_BYTES.search(chunk) is not None


def _chunks_of_lines(p: Path):
    """The file in pieces of about PRESCAN_BYTES that end at a line's end (a longer line is one piece)."""
    with open(p, "rb") as f:
        tail = b""
        while block := f.read(PRESCAN_BYTES):
            data = tail + block
            cut = data.rfind(b"\n") + 1
            chunk, tail = data[:cut], data[cut:]
            if chunk:
                yield chunk
        if tail:
            yield tail


def _summary_if_plain(chunk: bytes) -> tuple[int, int] | None:
    """(non-blank lines, longest line) of `chunk` when it is UTF-8 and every non-blank line, stripped as bytes.strip()
    does, starts with `{` and ends with `}`; else None. Lines are tested in numpy; only a line that does not start
    and end with a brace right at its ends (blank, or padded with spaces) is stripped in Python."""
    import numpy as np

    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return None
    codes = np.frombuffer(chunk, dtype=np.uint8)
    newlines = np.flatnonzero(codes == ord("\n"))
    starts = np.concatenate(([0], newlines + 1))
    stops = np.append(newlines, len(codes))  # each line's end, before its newline
    if stops[-1] == starts[-1]:  # nothing after the last newline
        starts, stops = starts[:-1], stops[:-1]
    lengths = stops - starts + (stops < len(codes))  # as a line read from the file, its newline included
    filled = stops > starts
    stops = stops - (filled & (codes[np.maximum(stops - 1, 0)] == ord("\r")))  # CRLF line ends
    braced = (stops > starts) & (codes[np.minimum(starts, len(codes) - 1)] == ord("{")) \
        & (codes[np.maximum(stops - 1, 0)] == ord("}"))
    rows = int(braced.sum())
    longest = int(lengths[braced].max(initial=0))
    for index in np.flatnonzero(~braced):
        line = chunk[starts[index]:stops[index]].strip()
        if not line:
            continue
        if line[:1] != b"{" or line[-1:] != b"}":
            return None
        rows += 1
        longest = max(longest, int(lengths[index]))
    return rows, longest


def _parse_line(p: Path, name: str, number: int, raw: bytes):
    """One JSON-lines row as a dict, None for a blank line; UserError naming the line otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: line {number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start + 1}); save the file as UTF-8") from None
    if number == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{name}: line {number}: not valid JSON ({_json_error(e)})" + _json_hint(p)) from None
    if not isinstance(row, dict):
        raise UserError(f"{name}: line {number}: a JSON {_kind(row)}, not an object "
                        "(each line must be one object with the row's columns)")
    return row


def read_json_lines(p: Path, name: str) -> tuple[list[dict], list[int]]:
    """(rows, line number of each row), or UserError at the first line that is not a JSON object."""
    rows: list[dict] = []
    lines: list[int] = []
    with open(p, "rb") as f:
        for number, raw in enumerate(f, 1):
            row = _parse_line(p, name, number, raw)
            if row is not None:
                rows.append(row)
                lines.append(number)
    if not rows:
        raise UserError(f"{name}: empty file (no rows)")
    return rows, lines


def read_json_array(p: Path, name: str) -> list[dict]:
    data = p.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{name}: line {line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{name}: line {e.lineno}: not valid JSON ({_json_error(e)})") from None
    if not isinstance(rows, list):  # cannot happen for text starting with "[", kept for safety
        raise UserError(f"{name}: a JSON file must hold a list of objects")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{name}: item {index} of the list is a JSON {_kind(row)}, not an object "
                            "(a JSON file must hold a list of objects)")
    for index, row in enumerate(rows):
        if (bad := unusable_key(row)) is not None:
            raise UserError(f"{name}: item {index}: {bad_key_message(bad)}")
    if rows and not any(rows):
        raise UserError(f"{name}: item 0: row has no columns (an empty object {{}}); each row needs at least one key")
    if not rows:
        raise UserError(f"{name}: empty list (no rows)")
    return rows


def _json_error(e: json.JSONDecodeError) -> str:
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def first_char(p: Path) -> str:
    with open(p, "rb") as f:
        head = f.read(4096)
    return head.decode("utf-8", errors="replace").removeprefix("\ufeff").lstrip()[:1]


def _json_hint(p: Path) -> str:
    if p.suffix.lower() == ".json":
        return "; a .json file must hold one list of objects, or one object per line"
    return ""


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def number_texts(path: str | os.PathLike, column: str) -> list[str | None] | None:
    """Each row's top-level `column` number as the JSON (or JSONL) file writes it, for a column arrow read as floats
    (an integer among floats, `1` beside `2.5`, would otherwise be written as "1.0"): an integer as str(int), a
    float as str(float); None for a value that is not a number. None for a file that is not JSON. Python reads
    every row (json.loads), so this is for the `id` and `answer` columns only, and only when they are floats."""
    p = Path(path)
    if p.suffix.lower() not in (".jsonl", ".json"):
        return None

    def as_int(text: str):
        return _IntText(text)

    def text_of(value):
        if isinstance(value, _IntText):
            return str(int(value))
        if isinstance(value, float):
            return str(value)
        return None

    if p.suffix.lower() == ".json" and first_char(p) == "[":
        rows = json.loads(p.read_bytes().decode("utf-8").removeprefix("\ufeff"), parse_int=as_int)
        return [text_of(row.get(column)) for row in rows]
    texts = []
    with open(p, "rb") as f:
        for number, raw in enumerate(f, 1):
            text = raw.decode("utf-8")
            text = text.removeprefix("\ufeff") if number == 1 else text
            if text.strip():
                texts.append(text_of(json.loads(text, parse_int=as_int).get(column)))
    return texts


class _IntText(str):
    """An integer's JSON text (number_texts)."""


def where_in_file(source: str, index: int) -> str:
    """`line N, row I` for a JSON-lines file (found again only on this error path), else `row I`."""
    p = Path(source)
    if p.suffix.lower() in (".jsonl", ".json") and p.is_file():
        try:
            if p.suffix.lower() == ".jsonl" or first_char(p) != "[":
                with open(p, "rb") as f:
                    seen = -1
                    for number, raw in enumerate(f, 1):
                        if raw.strip():
                            seen += 1
                            if seen == index:
                                return f"line {number}, row {index}"
        except OSError:
            pass
    return f"row {index}"
