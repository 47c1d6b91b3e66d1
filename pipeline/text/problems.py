"""The problems contract, checked on a loaded table (`check_problems`): the required columns are there, no value is
empty, a problem or an answer is a string or a finite number, an id is a string or an integer, and ids are unique;
a refusal names the file, line, row and id.

The columns are tested as Arrow arrays, in batches of CHECK_BATCH_ROWS rows; Python sees a value only in columns of
lists, objects or mixed JSON values, and on the path that reports a duplicate id. An object, a list, a boolean, NaN
or an infinity as a problem or answer is refused with its row (a float column is tested with `is_finite`; in a column
of booleans, lists or objects the first non-null value is the one reported).
"""

from __future__ import annotations

import json
import math

from pipeline.core.errors import UserError
from pipeline.text.json_lines import where_in_file

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
        raise UserError(f"{source}: {where_in_file(source, index)} (id {row_id!r}): empty {column!r}")
    # Not plain: the model would be sent an object's or a list's Python repr as its problem, and an answer would be
    # graded against "{'value': 5}" or "nan". The first such value in row order is reported.
    wrong = [(found, column) for column in PLAIN_COLUMNS
             if column in ds.column_names and (found := _first_not_plain(ds, column)) is not None]
    if wrong:
        (index, kind, value), column = min(wrong, key=lambda bad: (bad[0][0], PLAIN_COLUMNS.index(bad[1])))
        row_id = f" (id {ds[index]['id']!r})" if "id" in ds.column_names else ""
        raise UserError(f"{source}: {where_in_file(source, index)}{row_id}: {column!r} is {kind}"
                        + (f" ({value})" if value else "")
                        + f"; {'an' if column[0] in 'aeiou' else 'a'} {column} must be a string or a number"
                        + _NOT_PLAIN_HINTS.get(kind, ""))
    if ids is not None and (bad_id := _first_bad_id(ds)) is not None:  # ids are checked only when required
        index, value = bad_id
        raise UserError(f"{source}: {where_in_file(source, index)}: id {_shown(value) or repr(value)} is not a string "
                        "or an integer (an id must be a string or an integer, e.g. \"a1\" or 7)")
    if unique_ids and ids is not None and _has_duplicates(ids):
        seen: set = set()  # found again, in row order, only on this error path
        for start, batch in _batches(ids):
            for index, row_id in enumerate(batch["id"], start):
                if row_id in seen:
                    raise UserError(f"{source}: {where_in_file(source, index)}: duplicate id {row_id!r}")
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
