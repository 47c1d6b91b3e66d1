"""Arrow under every reader of `pipeline.text.tables`: record batches written to a memory-mapped Dataset
(`memory_mapped`), a table as a Dataset, parquet and .arrow files (`read_arrow_file`), the column names a table cannot
hold (empty, or holding a NUL: `unusable_key`, `bad_field_name`), and the one-line reason of an error from datasets or
pyarrow (`error_reason`).

parquet is read by pyarrow, row group by row group into a memory-mapped Arrow file; .arrow files by `datasets`
(memory-mapped). The Arrow file a parsed table becomes is in this process's temporary dir
(`pipeline.core.artifacts.temp_dir`, `$TMPDIR/distill-tmp-*`), removed when the process exits, or by the next
`distill run` or `distill status` when a kill left it; not in the datasets cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.core.errors import UserError


def read_arrow_file(p: Path, name: str, suffix: str):
    """A parquet or .arrow file as a memory-mapped Dataset; UserError, with the reason, where it does not read."""
    import datasets

    try:
        if suffix == ".parquet":
            # pyarrow directly: datasets' parquet builder logs its own traceback before raising.
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(str(p))
            except Exception:  # noqa: BLE001 - the readers below report it
                schema = None
            if schema is not None and (bad := bad_field_name(schema)) is not None:
                raise UserError(f"{name}: {bad_key_message(bad)}")
            try:  # row group by row group into a memory-mapped file
                parquet = pq.ParquetFile(str(p))
                ds = memory_mapped(parquet.schema_arrow, parquet.iter_batches())
            except Exception:  # noqa: BLE001 - the whole-file reader, below, reports what is wrong in its words
                ds = None
            if ds is None:
                ds = dataset_from_table(pq.read_table(str(p)))
        else:
            ds = datasets.Dataset.from_file(str(p))  # memory-mapped
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets and pyarrow raise many kinds; reported, not a traceback
        kind = "parquet" if suffix == ".parquet" else "Arrow (datasets cache / IPC stream)"
        raise UserError(f"{name}: not a readable {kind} file: {error_reason(e)}") from None
    if len(ds) == 0 and not ds.column_names:
        raise UserError(f"{name}: empty table (no rows)")
    return ds


def memory_mapped(schema, batches, count: int | None = None):
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


def dataset_from_table(table):
    """An in-memory pyarrow Table as a Dataset."""
    import datasets
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    # Without a fingerprint, datasets hashes the whole table to make one: seconds and a copy's worth of memory.
    return datasets.Dataset(InMemoryTable(table), fingerprint=generate_random_fingerprint())


def arrow_errors() -> tuple:
    """What pyarrow raises for values it cannot store as one column."""
    import pyarrow as pa

    return (pa.ArrowException, TypeError, ValueError, OverflowError)


def error_reason(e: BaseException) -> str:
    """The innermost cause's message, on one line (datasets wraps the real error in DatasetGenerationError)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def unusable_key(value, path: tuple = ()) -> tuple | None:
    """The key path of the first object key, at any depth, that is empty or holds a NUL; None when there is none.
    Arrow and datasets cannot hold such a column name (they crash or mangle it)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "" or "\x00" in key:
                return path + (key,)
            if (found := unusable_key(inner, path + (key,))) is not None:
                return found
    elif isinstance(value, list):
        for inner in value:
            if (found := unusable_key(inner, path)) is not None:
                return found
    return None


def bad_key_message(key_path: tuple) -> str:
    where = "" if len(key_path) == 1 else f" (in {'.'.join(map(repr, key_path[:-1]))})"
    return (f"column name {key_path[-1]!r}{where} is empty or holds a NUL character, which a table cannot hold; "
            "rename the key")


def bad_field_name(schema) -> tuple | None:
    """`unusable_key` for an Arrow schema (parquet): the first field name, at any depth, that is empty or holds a NUL."""
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
