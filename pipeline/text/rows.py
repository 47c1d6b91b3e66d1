"""Building data rows in Arrow and writing them in batches: chat-message columns, how each trace was sampled.

The steps that turn graded samples into training data (select, pairs) build their `messages` / `chosen` /
`rejected` columns here from a batch of samples, carry the `SAMPLING_COLUMNS` along, and write the rows BATCH_ROWS
at a time (`write_rows`), so memory holds one batch of traces.
"""

from __future__ import annotations

from pipeline.text.columns import BATCH_ROWS, numbers

# Sample columns carried into training data (as named here): how each trace was sampled.
SAMPLING_COLUMNS = {"think_prefix": "think_prefix", "prompt_text": "prompt_text", "model": "sampled_by"}


def assistant_texts(table):
    """Assistant message per row (Arrow): the think prefix the completion continues (if recorded), then the
    completion."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def text(column):  # nulls as "" (a column of nothing but nulls has Arrow's null type)
        return pc.fill_null(column.cast(pa.string()) if pa.types.is_null(column.type) else column, "")

    if "think_prefix" not in table.column_names:
        return text(table["completion"])
    return pc.binary_join_element_wise(text(table["think_prefix"]), text(table["completion"]), "")


def with_message(prompts, texts, role: str = "assistant"):
    """Each row's chat messages with one more message (`role`, `texts`) at the end, built in Arrow: no Python
    object per message."""
    import pyarrow as pa

    prompts = prompts.combine_chunks() if isinstance(prompts, pa.ChunkedArray) else prompts
    return concat_lists(prompts, message_list(message(texts, prompts.type.value_type, role), prompts.type))


def message(texts, message_type, role: str = "assistant"):
    """Chat messages (`role`, `texts`) as an Arrow struct array of `message_type`; its other fields null."""
    import pyarrow as pa

    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    fields = {"role": pa.array([role] * len(texts)), "content": texts}
    return pa.StructArray.from_arrays(
        [fields[f.name].cast(f.type) if f.name in fields else pa.nulls(len(texts), f.type) for f in message_type],
        fields=list(message_type))


def message_list(messages, list_type):
    """One-message lists, one per row, of Arrow type `list_type`."""
    import numpy as np
    import pyarrow as pa

    offsets = pa.array(np.arange(len(messages) + 1), type=pa.int64() if pa.types.is_large_list(list_type)
                       else pa.int32())
    return type(pa.array([], type=list_type)).from_arrays(offsets, messages, type=list_type)


def concat_lists(first, second):
    """Row-wise concatenation of two list arrays of the same type and length."""
    import numpy as np
    import pyarrow as pa

    first_lengths = numbers(first.value_lengths(), np.int64)
    second_lengths = numbers(second.value_lengths(), np.int64)
    lengths = first_lengths + second_lengths
    offsets = np.r_[0, np.cumsum(lengths)]
    row = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(offsets[-1]) - offsets[:-1][row]
    first_values, second_values = first.flatten(), second.flatten()
    first_starts = np.r_[0, np.cumsum(first_lengths)][:-1]
    second_starts = np.r_[0, np.cumsum(second_lengths)][:-1]
    take = np.where(within < first_lengths[row], first_starts[row] + within,
                    len(first_values) + second_starts[row] + within - first_lengths[row])
    values = pa.concat_arrays([first_values, second_values]).take(pa.array(take))
    offset_type = pa.int64() if pa.types.is_large_list(first.type) else pa.int32()
    return type(first).from_arrays(pa.array(offsets, type=offset_type), values, type=first.type)


def sampling_columns(table) -> dict:
    """The `SAMPLING_COLUMNS` an Arrow table of samples has, under their training-data names."""
    return {name: table[column] for column, name in SAMPLING_COLUMNS.items() if column in table.column_names}


def sampling_features(features) -> dict:
    return {name: features[column] for column, name in SAMPLING_COLUMNS.items() if column in features}


def write_rows(count: int, make_batch, features, path):
    """A Dataset of `count` rows made by `make_batch(start, stop) -> pyarrow Table`, BATCH_ROWS at a time, written
    to an Arrow file at `path` (a scratch file: memory holds one batch) and memory-mapped back."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with ArrowWriter(features=features, path=str(path)) as writer:
        for start in range(0, count, BATCH_ROWS):
            writer.write_table(make_batch(start, min(start + BATCH_ROWS, count)))
        writer.finalize()
    return Dataset.from_file(str(path))


def warn_dry_run_stand_ins(step: str, why: str, rows: int) -> None:
    # A dry run's samples (2 per problem, 16 tokens) seldom hold a correct answer. So that the steps after this one
    # still run on something, it writes stand-ins whatever their labels; a dry run's data is never for use.
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]{step}: {why} in this dry run; writing {rows} stand-in row(s) whatever "
                               f"their labels, so that the steps after it run (never in a real run)")
