"""Read a table of problems (JSONL, JSON, parquet, Arrow file or a saved dataset dir) and check the problems contract.

Used by the `load` step and by the benchmark registry (eval/benchmarks.py). Bad input raises `UserError` with a
message that names the file and, where there is one, the line and row id — never a `datasets` traceback:

- JSONL (and .json that is not one array): a first pass checks every line for strict UTF-8 and for being one
  object (`{...}`), in numpy over 8 MiB pieces (line by line in Python only in a piece with something to report),
  then pyarrow's streaming JSON reader parses the file block by block into an Arrow file that the Dataset
  memory-maps, so time grows linearly with the rows and memory stays bounded. A block whose columns or types differ
  from the first block's sends the file to pyarrow's whole-file reader (which unifies the blocks, in memory); a
  line that reader refuses (and any line whose type changes) sends it down a slow path that reads it line by line
  with `json.loads`, so a broken line, a line that is not an object or bytes that are not UTF-8 are reported with
  their line number. Blank lines are skipped; columns are the union of every row's keys; strings stay strings
  (pyarrow would turn ISO dates into timestamps). The Arrow file is in this process's temporary dir
  (`pipeline.core.artifacts.temp_dir`, `$TMPDIR/distill-tmp-*`), removed when the process exits, or by the next
  `distill run` or `distill status` when a kill left it; not in the datasets cache.
- A top-level column of plain values that arrow cannot store as one type (strings mixed with numbers, an integer
  beyond 64 bits) becomes a column of strings, losslessly (`2` -> `"2"`; ids and answers are strings in every
  contract anyway). Other mixes (an object in one row, a string in another; a boolean among strings, which must
  not become the string "true") get datasets' `Json` feature, as `datasets.Dataset.from_json` gives them; a value
  that even that cannot store, and NaN or an infinity in such a mixed column (it would become the string "NaN" or a
  null), is reported with its line.
- .json holding one array of objects: each item must be an object (reported by item index).
- parquet is read by pyarrow, row group by row group into a memory-mapped Arrow file as above; .arrow files and
  dataset dirs by `datasets` (memory-mapped); a file or dir that cannot be read is reported with the reason.
- `check_problems` tests the columns as Arrow arrays, in batches; Python sees a value only in columns of lists,
  objects or mixed JSON values, and on the path that reports a duplicate id. `problem` and `answer` must be strings
  or finite numbers: an object, a list, a boolean, NaN or an infinity is refused with its row (a float column is
  tested with `is_finite`; in a column of booleans, lists or objects the first non-null value is the one reported).
- A path that is empty, or names a FIFO, a socket or a device, is refused before anything opens it (a FIFO would
  block the reader forever).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
from pathlib import Path

from pipeline.core.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
_SUFFIX_HELP = "use .jsonl, .json, .parquet, .arrow or a dir written by datasets.save_to_disk"


def read_table(path: str | os.PathLike):
    """A datasets.Dataset from a file or a saved dataset dir, chosen by what is on disk."""
    name = str(path)
    if not name.strip():  # Path("") is the working directory
        raise UserError("empty path: name a data file or a dir written by datasets.save_to_disk")
    p = Path(path)
    try:
        mode = p.stat().st_mode  # follows links: what is read is what it points at
    except FileNotFoundError:
        raise UserError(f"{name}: file not found (relative paths are read from {Path.cwd()})") from None
    except OSError as e:
        raise UserError(f"{name}: cannot read: {e.strerror or e}") from None
    # Before anything opens it: reading a FIFO blocks until a writer comes, a device may never end.
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UserError(f"{name}: is a {special_file_kind(mode)}, not a regular file or directory")
    if stat.S_ISDIR(mode):
        return _read_dataset_dir(p, name)
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{name}: unsupported file type {suffix!r} ({_SUFFIX_HELP})")
    if not p.is_file():
        raise UserError(f"{name}: not a regular file")
    try:
        if suffix in (".jsonl", ".json"):
            return _read_json(p, name)
        return _read_arrow_file(p, name, suffix)
    except UserError:
        raise
    except OSError as e:  # unreadable: permissions, I/O errors
        raise UserError(f"{name}: cannot read: {e.strerror or e}") from None


def special_file_kind(mode: int) -> str:
    """What a file that is neither a regular file nor a directory is, in words, from its `st_mode`."""
    for test, kind in ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


# Contract columns whose values must be strings or numbers, wherever they are present (required or not).
PLAIN_COLUMNS = ("problem", "answer")


def check_problems(ds, source: str, require: list[str], unique_ids: bool = True):
    """Refuse missing columns, empty values, a problem or answer that is not a string or a number, and duplicate
    ids, naming the file, line, row and id."""
    missing = [c for c in require if c not in ds.column_names]
    if missing:
        raise UserError(f"{source}: missing column(s) {missing}; columns are {ds.column_names} "
                        "(rename with `columns: {old: new}`)")
    # Column by column, in batches of Arrow arrays: memory stays bounded, and no Python object per value is made
    # unless the column holds lists, objects or mixed JSON values. The first empty value in row order is reported.
    ids = ds.select_columns(["id"]) if "id" in require else None
    empties = [(index, column) for column in require if (index := _first_empty(ds, column)) is not None]
    if empties:
        index, column = min(empties, key=lambda empty: (empty[0], require.index(empty[1])))
        row_id = ids[index]["id"] if ids is not None else index
        raise UserError(f"{source}: {_where(source, index)} (id {row_id!r}): empty {column!r}")
    # Not plain: the model would be sent an object's or a list's Python repr as its problem, and an answer would be
    # graded against "{'value': 5}" or "nan". The first such value in row order is reported.
    wrong = [(found, column) for column in PLAIN_COLUMNS
             if column in ds.column_names and (found := _first_not_plain(ds, column)) is not None]
    if wrong:
        (index, kind, value), column = min(wrong, key=lambda bad: (bad[0][0], PLAIN_COLUMNS.index(bad[1])))
        row_id = f" (id {ds[index]['id']!r})" if "id" in ds.column_names else ""
        raise UserError(f"{source}: {_where(source, index)}{row_id}: {column!r} is {kind}"
                        + (f" ({value})" if value else "")
                        + f"; {'an' if column[0] in 'aeiou' else 'a'} {column} must be a string or a number"
                        + _NOT_PLAIN_HINTS.get(kind, ""))
    if ids is not None and (bad_id := _first_bad_id(ds)) is not None:  # ids are checked only when required
        index, value = bad_id
        raise UserError(f"{source}: {_where(source, index)}: id {_shown(value) or repr(value)} is not a string or an "
                        "integer (an id must be a string or an integer, e.g. \"a1\" or 7)")
    if unique_ids and ids is not None and _has_duplicates(ids):
        seen: set = set()  # found again, in row order, only on this error path
        for start, batch in _batches(ids):
            for index, row_id in enumerate(batch["id"], start):
                if row_id in seen:
                    raise UserError(f"{source}: {_where(source, index)}: duplicate id {row_id!r}")
                seen.add(row_id)


CHECK_BATCH_ROWS = 65_536


def _batches(ds, arrow: bool = False):
    """(index of the first row, batch) over `ds` in CHECK_BATCH_ROWS rows: pyarrow Tables, or decoded column lists."""
    for number, batch in enumerate((ds.with_format("arrow") if arrow else ds).iter(batch_size=CHECK_BATCH_ROWS)):
        yield number * CHECK_BATCH_ROWS, batch


def _plain_dtype(feature) -> str | None:
    """The dtype of a plain `Value` column (strings, numbers, booleans); None for lists, objects, Json and the like."""
    import datasets

    return feature.dtype if isinstance(feature, datasets.Value) else None


def _first_empty(ds, column: str) -> int | None:
    """Index of the first row whose `column` is null or a string of only whitespace, as Python's `strip` sees it."""
    import pyarrow.compute as pc

    dtype = _plain_dtype(ds.features[column])
    values = ds.select_columns([column])
    if dtype is None:  # decoded as Python sees them: a Json column can hold a string in one row, a list in another
        for start, batch in _batches(values):
            for index, value in enumerate(batch[column], start):
                if value is None or (isinstance(value, str) and not value.strip()):
                    return index
        return None
    for start, batch in _batches(values, arrow=True):
        array = batch.column(0)
        empty = array.is_null()
        if dtype in ("string", "large_string"):  # arrow's whitespace is Python's (str.isspace), as a test checks
            blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(array)), 0)
            empty = pc.or_kleene(empty, blank)
        position = pc.index(empty, True).as_py()
        if position >= 0:
            return start + position
    return None


_NOT_PLAIN_HINTS = {
    # JSON's true/false is no maths answer, and written out it is neither what the file says nor what a model
    # writes (str() gives "True"); a boolean answer is most often a flag column (is_correct) renamed onto `answer`.
    "a boolean": " (true/false is no problem or answer to grade; if the word is meant, write it as a string, "
                 "\"true\")",
    "NaN": " (NaN is no value: give the row its value, or drop the row)",
    "Infinity": r" (write it as a string, e.g. \infty)",
    "-Infinity": r" (write it as a string, e.g. -\infty)",
    "an object": " (flatten the file so that the text is a column of its own; `columns:` renames it)",
    "a list": " (keep one value per row, or join the values into one string)",
}


def _not_plain(value) -> str | None:
    """What `value` is, in words, when it is not a string, a finite number or null; None when it is one."""
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, bool):  # before int: True is an int to Python
        return "a boolean"
    if isinstance(value, int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "NaN" if math.isnan(value) else "Infinity" if value > 0 \
            else "-Infinity"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__} value"


def _shown(value) -> str:
    """An object or list as a short JSON text, for a message; empty for anything else."""
    if not isinstance(value, (dict, list, tuple)):
        return ""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_not_plain(ds, column: str) -> tuple[int, str, str] | None:
    """(index, what it is, the value shown) of the first row whose `column` is not a string, a finite number or null.
    In Arrow, batch by batch: a float column is tested with is_finite; in a column of booleans, lists, objects,
    dates or bytes every value is one, so the first non-null is found. Python decodes the values only of a column
    of mixed JSON values (a string in one row, an object in another) or of other features (class labels, images)."""
    import datasets
    import pyarrow.compute as pc

    feature = ds.features[column]
    dtype = _plain_dtype(feature)
    if dtype is not None and (dtype in ("string", "large_string", "null")
                              or dtype.startswith(("int", "uint", "decimal"))):
        return None
    values = ds.select_columns([column])
    if dtype is None and not isinstance(feature, (dict, datasets.List, datasets.LargeList)):
        for start, batch in _batches(values):
            for index, value in enumerate(batch[column], start):
                if (kind := _not_plain(value)) is not None:
                    return index, kind, _shown(value)
        return None
    for start, batch in _batches(values, arrow=True):
        array = batch.column(0)
        bad = pc.invert(pc.is_finite(array)) if dtype is not None and dtype.startswith("float") else array.is_valid()
        position = pc.index(bad, True).as_py()  # nulls are skipped: an empty value is reported as empty
        if position >= 0:
            value = array[position].as_py()
            kind = _not_plain(value) or ("an object" if isinstance(feature, dict) else "a list" if dtype is None
                                         else f"a {dtype} value")
            return start + position, kind, _shown(value)
    return None


def _first_bad_id(ds) -> tuple[int, object] | None:
    """(index, value) of the first id that is neither a string nor an integer (a float must be finite and whole:
    Infinity would load as the id "inf", 1.5 as "1.5"; a list or an object cannot be compared as an id); None when
    every id is one. In Arrow for string, integer and float columns; decoded only for other columns."""
    import pyarrow.compute as pc

    dtype = _plain_dtype(ds.features["id"])
    if dtype is not None and (dtype in ("string", "large_string", "null") or dtype.startswith(("int", "uint"))):
        return None
    values = ds.select_columns(["id"])
    if dtype is not None and dtype.startswith("float"):
        for start, batch in _batches(values, arrow=True):
            array = batch.column(0)
            whole = pc.and_(pc.is_finite(array), pc.equal(pc.floor(array), array))
            position = pc.index(pc.invert(whole), True).as_py()  # nulls are skipped: reported as empty
            if position >= 0:
                return start + position, array[position].as_py()
        return None
    for start, batch in _batches(values):
        for index, value in enumerate(batch["id"], start):
            if value is not None and not (isinstance(value, str) or (isinstance(value, int)
                                                                    and not isinstance(value, bool))):
                return index, value
    return None


def _has_duplicates(ids) -> bool:
    """Whether the one-column dataset `ids` repeats a value (null counts as a value, as in a Python set)."""
    import pyarrow.compute as pc

    dtype = _plain_dtype(ids.features["id"])
    if dtype is None or not (dtype in ("string", "large_string") or dtype.startswith(("int", "uint"))):
        # floats (NaN is not equal to itself), lists, objects: as a Python set sees them
        decoded = [row_id for _, batch in _batches(ids) for row_id in batch["id"]]
        return len(set(decoded)) < len(decoded)
    column = ids.with_format("arrow")[:].column(0)
    return pc.count_distinct(column, mode="all").as_py() < len(column)


# --- JSON and JSONL ------------------------------------------------------------------------------------------------


def _read_json(p: Path, name: str):
    import pyarrow.json as paj

    if p.suffix.lower() == ".json" and _first_char(p) == "[":
        return _dataset_from_rows(_read_json_array(p, name), None, name)
    # Fast path: a cheap pass checks what pyarrow's reader lets through (bytes that are not UTF-8, a line that is
    # not an object, which can even crash it), then pyarrow parses the file block by block into a memory-mapped
    # file. A block that does not fit the first block's columns and types takes pyarrow's whole-file reader;
    # anything that refuses (a broken line, a column whose type changes) takes the slow path, which names the line
    # or reads the rows.
    count, longest = _prescan(p, name)
    options = paj.ReadOptions(block_size=max(1 << 20, 2 * longest + 2))
    ds = _stream_json(p, options, count)
    if ds is None:
        table = None
        try:
            table = paj.read_json(str(p), read_options=options)
            if table.num_rows != count:  # e.g. two objects on one line
                table = None
            elif _has_timestamps(table.schema):  # JSON has no timestamps: keep ISO-date strings as written
                schema = _strings_for_timestamps(table.schema)
                table = paj.read_json(str(p), read_options=options,
                                      parse_options=paj.ParseOptions(explicit_schema=schema))
            if table is not None:
                table.validate(full=True)  # a corrupt list array (see _validated) raises: the slow path reads it
        except Exception:  # noqa: BLE001 - the slow path below reports what is wrong, with its line
            table = None
        ds = None if table is None else _dataset_from_table(table)
    if ds is None or _rounds_integers(ds):
        rows, lines = _read_json_lines(p, name)
        ds = _dataset_from_rows(rows, lines, name)
    if not ds.column_names:  # every row is {}: Arrow keeps no rows without columns; refused, not lost
        raise UserError(f"{name}: {_where(name, 0)}: row has no columns (an empty object {{}}); "
                        "each row needs at least one key")
    if p.suffix.lower() == ".json" and len(ds) == 1:  # {"data": [{...}, ...]}: one row holding the real rows
        nested = [c for c, f in ds.features.items() if _is_list_of_objects(f)]
        if nested:
            raise UserError(f"{name}: one JSON object whose {nested[0]!r} is a list of objects; a .json file must "
                            f"hold a list of objects (or one object per line): save that list on its own")
    return ds


def _rounds_integers(ds) -> bool:
    """Whether a float column, or a float inside a column of lists or objects, holds a value of 2**53 or more:
    pyarrow reads integers with one beyond 64 bits (or integers among floats) as floats, which cannot hold such
    integers exactly (1180591620717411303424 would load as 1.1805916207174113e+21, 9007199254740993 in a list of
    floats as 9007199254740992.0). The slow path reads the numbers as Python does and keeps them exact. In Arrow:
    list columns are flattened, struct fields taken, column by column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def large(array) -> bool:
        t = array.type
        if pa.types.is_floating(t):
            largest = pc.max(pc.abs(array)).as_py()
            return largest is not None and largest >= 2 ** 53
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return large(pc.list_flatten(array))
        if pa.types.is_struct(t):
            return any(large(pc.struct_field(array, [i])) for i in range(t.num_fields))
        return False

    table = ds.with_format("arrow")[:]
    return any(large(table.column(i)) for i in range(table.num_columns))


def _stream_json(p: Path, options, count: int):
    """The file as a memory-mapped Dataset, parsed one block at a time; None where a later block does not fit the
    columns and types pyarrow inferred from the first (a new key, a number after a string, ...) or the rows do not
    match the lines: pyarrow's whole-file reader, which unifies the blocks, or the slow path then reads it."""
    import pyarrow.json as paj

    try:
        reader = paj.open_json(str(p), read_options=options)
        if _has_timestamps(reader.schema):  # JSON has no timestamps: keep ISO-date strings as written
            schema = _strings_for_timestamps(reader.schema)
            reader = paj.open_json(str(p), read_options=options, parse_options=paj.ParseOptions(explicit_schema=schema))
        return _memory_mapped(reader.schema, _validated(reader), count)
    except Exception:  # noqa: BLE001 - the whole-file reader or the slow path reports what is wrong
        return None


def _validated(batches):
    """`batches`, each checked in full: pyarrow's JSON reader can build a corrupt list array (`{"b": [null, ""]}`:
    list offsets beyond the values), which reads as wrong values or crashes; such a batch raises, and the file takes
    the slow path."""
    for batch in batches:
        batch.validate(full=True)
        yield batch


def _memory_mapped(schema, batches, count: int | None = None):
    """A Dataset memory-mapped from `batches` written to an Arrow file in this process's temporary dir (removed when
    the process exits, or after a kill by the next run: `pipeline.core.artifacts.temp_dir`): the rows are never all in
    memory. None where `count` is given and the rows are not that many."""
    import tempfile

    import datasets
    import pyarrow as pa

    from pipeline.core.artifacts import temp_dir

    handle, path = tempfile.mkstemp(suffix=".arrow", dir=temp_dir())
    os.close(handle)
    try:
        rows = 0
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
        if count is not None and rows != count:  # e.g. two objects on one line
            os.unlink(path)
            return None
        return datasets.Dataset.from_file(path)
    except BaseException:
        os.unlink(path)
        raise


def _is_list_of_objects(feature) -> bool:
    import datasets

    inner = getattr(feature, "feature", None)
    return isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(inner, dict)


def _prescan(p: Path, name: str) -> tuple[int, int]:
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
                if (bad := _bad_key(row)) is not None:
                    bad_key = f"{name}: line {number}: {_bad_key_message(bad)}"
                    break
        lines_before += chunk.count(b"\n") + (not chunk.endswith(b"\n"))
    if not count:
        raise UserError(f"{name}: empty file (no rows)")
    if bad_key is not None:
        _read_json_lines(p, name)  # a line that is not JSON is reported first, wherever it is
        raise UserError(bad_key)
    return count, longest


PRESCAN_BYTES = 8 << 20

_BAD_KEY_BYTES = re.compile(rb'""\s*:|\\u0000|\x00')


def _may_have_bad_key(chunk: bytes) -> bool:
    """Whether `chunk` may hold an object key that is empty or holds a NUL (`"":`, `\\u0000`, a raw NUL): one regex
    search in C; only then are its lines parsed in Python."""
    return _BAD_KEY_BYTES.search(chunk) is not None


def _bad_key(value, path: tuple = ()) -> tuple | None:
    """The key path of the first object key, at any depth, that is empty or holds a NUL; None when there is none.
    Arrow and datasets cannot hold such a column name (they crash or mangle it)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "" or "\x00" in key:
                return path + (key,)
            if (found := _bad_key(inner, path + (key,))) is not None:
                return found
    elif isinstance(value, list):
        for inner in value:
            if (found := _bad_key(inner, path)) is not None:
                return found
    return None


def _bad_key_message(key_path: tuple) -> str:
    where = "" if len(key_path) == 1 else f" (in {'.'.join(map(repr, key_path[:-1]))})"
    return (f"column name {key_path[-1]!r}{where} is empty or holds a NUL character, which a table cannot hold; "
            "rename the key")


def _bad_field_name(schema) -> tuple | None:
    """`_bad_key` for an Arrow schema (parquet): the first field name, at any depth, that is empty or holds a NUL."""
    import pyarrow as pa

    def walk(t, path):
        if pa.types.is_struct(t):
            for i in range(t.num_fields):
                f = t.field(i)
                if f.name == "" or "\x00" in f.name:
                    return path + (f.name,)
                if (found := walk(f.type, path + (f.name,))) is not None:
                    return found
        elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return walk(t.value_type, path)
        return None

    for f in schema:
        if f.name == "" or "\x00" in f.name:
            return (f.name,)
        if (found := walk(f.type, (f.name,))) is not None:
            return found
    return None


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


def _read_json_lines(p: Path, name: str) -> tuple[list[dict], list[int]]:
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


def _read_json_array(p: Path, name: str) -> list[dict]:
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
        if (bad := _bad_key(row)) is not None:
            raise UserError(f"{name}: item {index}: {_bad_key_message(bad)}")
    if rows and not any(rows):
        raise UserError(f"{name}: item 0: row has no columns (an empty object {{}}); each row needs at least one key")
    if not rows:
        raise UserError(f"{name}: empty list (no rows)")
    return rows


def _json_error(e: json.JSONDecodeError) -> str:
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _first_char(p: Path) -> str:
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


def _has_timestamps(schema) -> bool:
    import pyarrow as pa

    def has(t) -> bool:
        if pa.types.is_timestamp(t):
            return True
        if pa.types.is_struct(t):
            return any(has(t.field(i).type) for i in range(t.num_fields))
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return has(t.value_type)
        return False

    return any(has(field.type) for field in schema)


def _strings_for_timestamps(schema):
    import pyarrow as pa

    def swap(t):
        if pa.types.is_timestamp(t):
            return pa.string()
        if pa.types.is_struct(t):
            return pa.struct([t.field(i).with_type(swap(t.field(i).type)) for i in range(t.num_fields)])
        if pa.types.is_list(t):
            return pa.list_(t.value_field.with_type(swap(t.value_type)))
        if pa.types.is_large_list(t):
            return pa.large_list(t.value_field.with_type(swap(t.value_type)))
        return t

    return pa.schema([field.with_type(swap(field.type)) for field in schema])


def _dataset_from_table(table):
    import datasets
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    # Without a fingerprint, datasets hashes the whole table to make one: seconds and a copy's worth of memory.
    return datasets.Dataset(InMemoryTable(table), fingerprint=generate_random_fingerprint())


def _arrow_errors() -> tuple:
    import pyarrow as pa

    return (pa.ArrowException, TypeError, ValueError, OverflowError)


def _dataset_from_rows(rows: list[dict], lines: list[int] | None, name: str):
    """Rows (dicts) as a Dataset whose columns are the union of their keys, in order of first appearance."""
    import pyarrow as pa

    errors = _arrow_errors()
    columns: dict[str, None] = {}
    for row in rows:
        if len(row) != len(columns) or any(key not in columns for key in row):
            columns.update(dict.fromkeys(row))
    mapping = {column: [row.get(column) for row in rows] for column in columns}
    # A column arrow cannot store as one type, or only by changing values (pa.array makes true 1.0 among floats, and
    # an integer beyond 2**53 in a list of floats a float): plain values (strings mixed with numbers, ints beyond
    # int64) become strings, losslessly; other mixes (an object here, a string there, a boolean among numbers) get
    # datasets' Json feature; a value that even that refuses is reported with its line.
    for column, values in list(mapping.items()):
        try:
            array = pa.array(values)
            if _faithful(values, array.to_pylist()):
                mapping[column] = array
                continue
        except errors:
            pass
        # NaN and infinities among other types: json.dumps would write them as the strings "NaN" and "Infinity", and
        # datasets' Json feature as null, both silently; refused, with the line.
        odd = next((i for i, v in enumerate(values) if isinstance(v, float) and not math.isfinite(v)), None)
        if odd is not None:
            where = f"line {lines[odd]}" if lines is not None else f"item {odd}"
            row_id = rows[odd].get("id")
            id_part = f" (id {row_id!r})" if row_id is not None else ""
            raise UserError(f"{name}: {where}{id_part}: column {column!r}: {json.dumps(values[odd])} in a column of "
                            "other types cannot be stored as it is; write null, or the value as a string")
        # Booleans take the Json feature below, not strings: JSON's true would become the string "true" (and an
        # answer of true must be refused as such by check_problems, not graded as the text "true").
        if all(v is None or (isinstance(v, (str, int, float)) and not isinstance(v, bool)) for v in values):
            strings = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
            try:
                pa.array(strings, type=pa.string())
                mapping[column] = strings
                continue
            except errors:
                pass
        else:
            # Encoded here, as JSON text, not by datasets' Json feature: it keeps a string that parses as JSON as
            # that JSON (the string "null" would load as null, "1" as 1) and writes floats in 15 digits.
            try:
                texts = [None if v is None else json.dumps(v, ensure_ascii=False, allow_nan=False) for v in values]
                _check_json_decodes(texts, column, rows, lines, name)
                mapping[column] = pa.array(texts, type=pa.string()).cast(pa.json_())
                continue
            except errors:
                pass
        raise UserError(_first_bad_value(name, column, values, rows, lines))
    try:
        return _dataset_from_table(pa.Table.from_pydict(mapping))
    except Exception as e:  # noqa: BLE001 - reported, not a traceback
        raise UserError(f"{name}: cannot build a table from its rows: {_reason(e)}") from None


def _check_json_decodes(texts, column, rows, lines, name) -> None:
    """Refuse, with its line, a value datasets' Json feature could store but not read back (its decoder, pandas'
    ujson_loads, refuses an integer beyond 64 bits: every later read of the dataset would fail)."""
    from datasets.utils.json import ujson_loads

    for index, text in enumerate(texts):
        if text is None:
            continue
        try:
            ujson_loads(text)
        except ValueError as e:
            where = f"line {lines[index]}" if lines is not None else f"item {index}"
            row_id = rows[index].get("id")
            id_part = f" (id {row_id!r})" if row_id is not None else ""
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise UserError(f"{name}: {where}{id_part}: column {column!r}: cannot store {shown} in a column of mixed "
                            f"types ({e}); write the number as a string") from None


def _faithful(written: list, loaded: list) -> bool:
    """Whether arrow's values `loaded` are the Python values `written`: a boolean stays a boolean, an integer may
    become a float only of exactly its value, an object may gain keys holding null; NaN stays NaN."""
    def same(w, v) -> bool:
        if w is None:
            return v is None
        if isinstance(w, bool) or isinstance(v, bool):
            return isinstance(w, bool) and isinstance(v, bool) and w == v
        if isinstance(w, (int, float)):
            if isinstance(w, float) and math.isnan(w):
                return isinstance(v, float) and math.isnan(v)
            return isinstance(v, (int, float)) and v == w
        if isinstance(w, str):
            return isinstance(v, str) and v == w
        if isinstance(w, list):
            return isinstance(v, list) and len(v) == len(w) and all(map(same, w, v))
        if isinstance(w, dict):
            return (isinstance(v, dict) and all(same(x, v.get(k)) for k, x in w.items())
                    and all(x is None for k, x in v.items() if k not in w))
        return w == v

    return len(written) == len(loaded) and all(map(same, written, loaded))


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

    if p.suffix.lower() == ".json" and _first_char(p) == "[":
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


def _first_bad_value(name, column, values, rows, lines) -> str:
    """The first row whose `column` value cannot be stored with the values before it (bisection on prefixes)."""
    import datasets

    errors = _arrow_errors()
    low, high, cause = 1, len(values), None  # the prefix of `high` values fails; find the shortest that does
    while low < high:
        middle = (low + high) // 2
        try:
            datasets.Dataset.from_dict({column: values[:middle]}, on_mixed_types="use_json")
            low = middle + 1
        except errors:
            high = middle
    try:
        datasets.Dataset.from_dict({column: values[:high]}, on_mixed_types="use_json")
    except errors as e:
        cause = e
    index = high - 1
    where = f"line {lines[index]}" if lines is not None else f"item {index}"
    row_id = rows[index].get("id")
    id_part = f" (id {row_id!r})" if row_id is not None else ""
    value = json.dumps(values[index])
    value = value if len(value) <= 60 else value[:57] + "..."
    reason = f" ({_reason(cause)})" if cause is not None else ""
    return f"{name}: {where}{id_part}: column {column!r}: cannot store {value}{reason}"


def _where(source: str, index: int) -> str:
    """`line N, row I` for a JSON-lines file (found again only on this error path), else `row I`."""
    p = Path(source)
    if p.suffix.lower() in (".jsonl", ".json") and p.is_file():
        try:
            if p.suffix.lower() == ".jsonl" or _first_char(p) != "[":
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


# --- parquet, arrow, dataset dirs --------------------------------------------------------------------------------


def _read_arrow_file(p: Path, name: str, suffix: str):
    import datasets

    try:
        if suffix == ".parquet":
            # pyarrow directly: datasets' parquet builder logs its own traceback before raising.
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(str(p))
            except Exception:  # noqa: BLE001 - the readers below report it
                schema = None
            if schema is not None and (bad := _bad_field_name(schema)) is not None:
                raise UserError(f"{name}: {_bad_key_message(bad)}")
            try:  # row group by row group into a memory-mapped file
                parquet = pq.ParquetFile(str(p))
                ds = _memory_mapped(parquet.schema_arrow, parquet.iter_batches())
            except Exception:  # noqa: BLE001 - the whole-file reader, below, reports what is wrong in its words
                ds = None
            if ds is None:
                ds = _dataset_from_table(pq.read_table(str(p)))
        else:
            ds = datasets.Dataset.from_file(str(p))  # memory-mapped
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets and pyarrow raise many kinds; reported, not a traceback
        kind = "parquet" if suffix == ".parquet" else "Arrow (datasets cache / IPC stream)"
        raise UserError(f"{name}: not a readable {kind} file: {_reason(e)}") from None
    if len(ds) == 0 and not ds.column_names:
        raise UserError(f"{name}: empty table (no rows)")
    return ds


def _read_dataset_dir(p: Path, name: str):
    import datasets

    saved = (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()
    if not saved and p.suffix.lower() in SUFFIXES:
        raise UserError(f"{name}: is a directory, not a {p.suffix} file")
    if not saved:
        hint = ""
        if (p / "data" / "state.json").is_file():
            hint = f"; a step's dataset is in {p / 'data'}"
        raise UserError(f"{name}: is a directory but not a dataset saved by datasets.save_to_disk "
                        f"(no state.json){hint}; {_SUFFIX_HELP}")
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - reported, not a traceback
        raise UserError(f"{name}: cannot read this saved dataset: {_reason(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise UserError(f"{name}: a DatasetDict with splits {splits}; point at one split's dir, "
                            f"e.g. {p / splits[0]}" if splits else f"{name}: a DatasetDict with no splits")
        ds = ds[splits[0]]
    return ds


def _reason(e: BaseException) -> str:
    """The innermost cause's message, on one line (datasets wraps the real error in DatasetGenerationError)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
