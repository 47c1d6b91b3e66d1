"""Reading a dataset's columns for column-wise work: Arrow tables, numpy arrays, problems numbered, tokens counted.

The data-building steps (verify, select, pairs, filter, teachers) work out which rows to keep on a few small columns
with pyarrow and numpy, never with a Python object per row: rows are grouped by problem through `problem_index`.
"""

from __future__ import annotations

BATCH_ROWS = 2_000  # rows read or written at a time: a batch of traces in memory, never all of them


def arrow_columns(dataset, names: list[str]):
    """`names` of `dataset` as a pyarrow Table (zero-copy over the memory-mapped data), for column-wise work."""
    return dataset.select_columns(names).with_format("arrow")[:]


def problem_index(ids) -> tuple:
    """(each row's problem number, the problem ids): problems numbered 0, 1, ... in order of first appearance."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(ids)
    chunks = encoded.chunks if isinstance(encoded, pa.ChunkedArray) else [encoded]
    codes = np.concatenate([np.zeros(0, dtype=np.int64)]
                           + [chunk.indices.to_numpy(zero_copy_only=False).astype(np.int64) for chunk in chunks])
    return codes, (chunks[-1].dictionary.to_pylist() if chunks else [])


def ranks_in_problem(codes):
    """For rows sorted by problem: each row's place among its problem's rows (0, 1, ...)."""
    import numpy as np

    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, dtype=np.int64)
    return np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))


def rows_by_problem(ids: list, sample_idx: list[int]) -> dict:
    """Problem id -> its rows in sample_idx order; problems in input order."""
    rows: dict = {problem_id: [] for problem_id in ids}
    for row in sorted(range(len(ids)), key=lambda r: sample_idx[r]):
        rows[ids[row]].append(row)
    return rows


def numbers(column, dtype):
    """An Arrow column as a numpy array; nulls as 0 (False)."""
    import pyarrow.compute as pc

    return pc.fill_null(column, 0 if dtype is not bool else False).to_numpy(zero_copy_only=False).astype(dtype)


def token_counts(count, dataset, text_of):
    """Tokens of `text_of(Arrow batch)` per row of `dataset`, counted BATCH_ROWS rows at a time."""
    import numpy as np

    batches = dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)
    return np.array([n for batch in batches for n in count(text_of(batch).to_pylist())], dtype=np.int64)


def token_counter(model_ref: str, inputs):
    """`count(texts) -> list[int]` with the tokenizer of `model_ref` (no special tokens added)."""
    from transformers import AutoTokenizer

    from pipeline.core.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_ref, inputs))
    return lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]
