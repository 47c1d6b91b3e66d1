"""A JSON or JSONL file as a Dataset (`read_json`), in time linear in the rows and bounded memory.

After its text is checked (`pipeline.text.json_lines.prescan`), pyarrow's streaming JSON reader parses the file block
by block into an Arrow file that the Dataset memory-maps (`pipeline.text.arrow_tables.memory_mapped`). A block whose
columns or types differ from the first block's sends the file to pyarrow's whole-file reader (which unifies the
blocks, in memory); a line that reader refuses (and any line whose type changes) sends it down a slow path that reads
it line by line with `json.loads` (`pipeline.text.json_lines.read_json_lines`), naming the line of what is wrong.
Columns are the union of every row's keys; strings stay strings (pyarrow would turn ISO dates into timestamps).

A top-level column of plain values that arrow cannot store as one type (strings mixed with numbers, an integer
beyond 64 bits) becomes a column of strings, losslessly (`2` -> `"2"`; ids and answers are strings in every
contract anyway). Other mixes (an object in one row, a string in another; a boolean among strings, which must
not become the string "true") get datasets' `Json` feature, as `datasets.Dataset.from_json` gives them; a value
that even that cannot store, and NaN or an infinity in such a mixed column (it would become the string "NaN" or a
null), is reported with its line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.text.arrow_tables import arrow_errors, dataset_from_table, error_reason, memory_mapped
from pipeline.text.json_lines import first_char, prescan, read_json_array, read_json_lines, where_in_file


def read_json(p: Path, name: str):
    import pyarrow.json as paj

    if p.suffix.lower() == ".json" and first_char(p) == "[":
        return _dataset_from_rows(read_json_array(p, name), None, name)
    # Fast path: a cheap pass checks what pyarrow's reader lets through (bytes that are not UTF-8, a line that is
    # not an object, which can even crash it), then pyarrow parses the file block by block into a memory-mapped
    # file. A block that does not fit the first block's columns and types takes pyarrow's whole-file reader;
    # anything that refuses (a broken line, a column whose type changes) takes the slow path, which names the line
    # or reads the rows.
    count, longest = prescan(p, name)
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
        ds = None if table is None else dataset_from_table(table)
    if ds is None or _rounds_integers(ds):
        rows, lines = read_json_lines(p, name)
        ds = _dataset_from_rows(rows, lines, name)
    if not ds.column_names:  # every row is {}: Arrow keeps no rows without columns; refused, not lost
        raise UserError(f"{name}: {where_in_file(name, 0)}: row has no columns (an empty object {{}}); "
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
        return memory_mapped(reader.schema, _validated(reader), count)
    except Exception:  # noqa: BLE001 - the whole-file reader or the slow path reports what is wrong
        return None


def _validated(batches):
    """`batches`, each checked in full: pyarrow's JSON reader can build a corrupt list array (`{"b": [null, ""]}`:
    list offsets beyond the values), which reads as wrong values or crashes; such a batch raises, and the file takes
    the slow path."""
    for batch in batches:
        batch.validate(full=True)
        yield batch


def _is_list_of_objects(feature) -> bool:
    import datasets

    inner = getattr(feature, "feature", None)
    return isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(inner, dict)


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


def _dataset_from_rows(rows: list[dict], lines: list[int] | None, name: str):
    """Rows (dicts) as a Dataset whose columns are the union of their keys, in order of first appearance."""
    import pyarrow as pa

    errors = arrow_errors()
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
        return dataset_from_table(pa.Table.from_pydict(mapping))
    except Exception as e:  # noqa: BLE001 - reported, not a traceback
        raise UserError(f"{name}: cannot build a table from its rows: {error_reason(e)}") from None


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
            raise UserError(f"{name}: {where}{id_part}: column {column!r}: cannot store {shown} as JSON in a table "
                            f"(an integer beyond 64 bits inside a list or an object, or among other types: {e}); "
                            "write the number as a string") from None


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


def _first_bad_value(name, column, values, rows, lines) -> str:
    """The first row whose `column` value cannot be stored with the values before it (bisection on prefixes)."""
    import datasets

    errors = arrow_errors()
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
    reason = f" ({error_reason(cause)})" if cause is not None else ""
    return f"{name}: {where}{id_part}: column {column!r}: cannot store {value}{reason}"
