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
  (pyarrow would turn ISO dates into timestamps). The Arrow file is in datasets' temporary dir, removed when the
  process exits, not in the datasets cache.
- A top-level column of plain values that arrow cannot store as one type (strings mixed with numbers, an integer
  beyond 64 bits) becomes a column of strings, losslessly (`2` -> `"2"`; ids and answers are strings in every
  contract anyway). Other mixes (an object in one row, a string in another) get datasets' `Json` feature, as
  `datasets.Dataset.from_json` gives them; a value that even that cannot store is reported with its line.
- .json holding one array of objects: each item must be an object (reported by item index).
- parquet is read by pyarrow, row group by row group into a memory-mapped Arrow file as above; .arrow files and
  dataset dirs by `datasets` (memory-mapped); a file or dir that cannot be read is reported with the reason.
- `check_problems` tests the columns as Arrow arrays, in batches; Python sees a value only in columns of lists,
  objects or mixed JSON values, and on the path that reports a duplicate id.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from pipeline.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
_SUFFIX_HELP = "use .jsonl, .json, .parquet, .arrow or a dir written by datasets.save_to_disk"


def read_table(path: str | os.PathLike):
    """A datasets.Dataset from a file or a saved dataset dir, chosen by what is on disk."""
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise UserError(f"{name}: file not found (relative paths are read from {Path.cwd()})")
    if p.is_dir():
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


def check_problems(ds, source: str, require: list[str], unique_ids: bool = True):
    """Refuse missing columns, empty values and duplicate ids, naming the file, line, row and id."""
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
        except Exception:  # noqa: BLE001 - the slow path below reports what is wrong, with its line
            table = None
        ds = None if table is None else _dataset_from_table(table)
    if ds is None or _rounds_integers(ds):
        rows, lines = _read_json_lines(p, name)
        ds = _dataset_from_rows(rows, lines, name)
    if p.suffix.lower() == ".json" and len(ds) == 1:  # {"data": [{...}, ...]}: one row holding the real rows
        nested = [c for c, f in ds.features.items() if _is_list_of_objects(f)]
        if nested:
            raise UserError(f"{name}: one JSON object whose {nested[0]!r} is a list of objects; a .json file must "
                            f"hold a list of objects (or one object per line): save that list on its own")
    return ds


def _rounds_integers(ds) -> bool:
    """Whether a top-level float column holds a value of 2**53 or more: pyarrow reads a column of integers with one
    beyond 64 bits as floats, which cannot hold such integers exactly (1180591620717411303424 would load as
    1.1805916207174113e+21). The slow path reads the numbers as Python does, and such a column becomes strings."""
    import pyarrow.compute as pc

    for column, feature in ds.features.items():
        if _plain_dtype(feature) in ("float64", "float32"):
            largest = pc.max(pc.abs(ds.with_format("arrow")[column])).as_py()
            if largest is not None and largest >= 2 ** 53:
                return True
    return False


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
        return _memory_mapped(reader.schema, reader, count)
    except Exception:  # noqa: BLE001 - the whole-file reader or the slow path reports what is wrong
        return None


def _memory_mapped(schema, batches, count: int | None = None):
    """A Dataset memory-mapped from `batches` written to an Arrow file in datasets' temporary dir (removed when the
    process exits): the rows are never all in memory. None where `count` is given and the rows are not that many."""
    import tempfile

    import datasets
    import pyarrow as pa
    from datasets.fingerprint import get_temporary_cache_files_directory

    handle, path = tempfile.mkstemp(suffix=".arrow", dir=get_temporary_cache_files_directory())
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
        lines_before += chunk.count(b"\n") + (not chunk.endswith(b"\n"))
    if not count:
        raise UserError(f"{name}: empty file (no rows)")
    return count, longest


PRESCAN_BYTES = 8 << 20


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
    import datasets
    import pyarrow as pa

    errors = _arrow_errors()
    columns: dict[str, None] = {}
    for row in rows:
        if len(row) != len(columns) or any(key not in columns for key in row):
            columns.update(dict.fromkeys(row))
    mapping = {column: [row.get(column) for row in rows] for column in columns}
    try:
        return _dataset_from_table(pa.Table.from_pydict(mapping))
    except errors:
        pass
    # Some column arrow cannot store as one type. Plain values (strings mixed with numbers, ints beyond int64)
    # become strings, losslessly; other mixes (an object here, a string there) get datasets' Json feature, as
    # datasets.Dataset.from_json gives them; a value that even that refuses is reported with its line.
    needs_json = False
    for column, values in mapping.items():
        try:
            pa.array(values)
            continue
        except errors:
            pass
        if all(v is None or isinstance(v, (str, int, float)) for v in values):
            strings = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
            try:
                pa.array(strings, type=pa.string())
                mapping[column] = strings
                continue
            except errors:
                pass
        else:
            try:
                datasets.Dataset.from_dict({column: values}, on_mixed_types="use_json")
                needs_json = True
                continue
            except errors:
                pass
        raise UserError(_first_bad_value(name, column, values, rows, lines))
    try:
        if needs_json:
            return datasets.Dataset.from_dict(mapping, on_mixed_types="use_json")
        return _dataset_from_table(pa.Table.from_pydict(mapping))
    except Exception as e:  # noqa: BLE001 - reported, not a traceback
        raise UserError(f"{name}: cannot build a table from its rows: {_reason(e)}") from None


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

            try:  # row group by row group into a memory-mapped file
                parquet = pq.ParquetFile(str(p))
                ds = _memory_mapped(parquet.schema_arrow, parquet.iter_batches())
            except Exception:  # noqa: BLE001 - the whole-file reader, below, reports what is wrong in its words
                ds = None
            if ds is None:
                ds = _dataset_from_table(pq.read_table(str(p)))
        else:
            ds = datasets.Dataset.from_file(str(p))  # memory-mapped
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
