"""Published traces into the `samples` contract: one row per trace, as the sample step writes them, from a dataset
that keeps several traces per problem in list columns (`explode_lists`) or one chat per row (`from_conversations`).

`explode_lists`: each problem row with list columns of equal length (OpenR1-Math-Raw: `generations` beside
`correctness: {math_verify_reparsed_answer: [...], ...}`) becomes one row per list position. `spec` maps a target
column to its source: a list column, or a dotted path into a struct column (`correctness.math_verify_answer`).
Every other column is the problem's, repeated on each of its traces, except the source columns, which are left out
(a trace row holding every trace of its problem would make the data quadratic). Each trace row gets `sample_idx`
(its place among its problem's traces) and, when the problem has a `problem` column, `prompt`: the chat messages
the sample step would have sent (the user turn rendered from `prompt_template`). Lists of unequal length in one row
are refused naming the row, its id and each column's length; a missing (null) list counts as empty. The target
`published_correct` must be a list of booleans (a grader's published verdict, which verify compares with its own).
The work is done in Arrow, BATCH_ROWS problems at a time: no Python object per trace.

`from_conversations`: a column of chat turns (`[{from|role, value|content}]`, the OpenThoughts / Bespoke-Stratos
form; roles user/human, assistant/gpt, system) becomes `prompt` (the turns before the last assistant turn, as
{role, content}) and `completion` (the last assistant turn, verbatim: its `<think>...</think>` or
`<|begin_of_thought|>...` span is kept), and `problem` (the last user turn) when the data has no `problem` column.

Both write through an Arrow file in the step's scratch dir, memory-mapped back, so memory holds one batch.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.text.columns import BATCH_ROWS
from pipeline.text.prompts import render_prompt

RESERVED_TARGETS = ("id", "sample_idx", "prompt")
PUBLISHED_CORRECT = "published_correct"
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def source_top(source: str, columns: list[str]) -> str:
    """The top-level column a source names: itself, or the struct column before the dot of `col.field`."""
    return source if source in columns else source.split(".", 1)[0]


def source_feature(features, source: str, where: str):
    """The `datasets` feature of a list source (a column or `struct.field`), refused when absent or not a list."""
    import datasets

    if source in features:
        feature, shown = features[source], source
    else:
        top, _, field = source.partition(".")
        if top not in features:
            raise UserError(f"{where}: explode names column {top!r}, which is not in the data "
                            f"(columns: {', '.join(features)})")
        parent = features[top]
        if not field or not isinstance(parent, dict) or field not in parent:
            fields = f" (its fields: {', '.join(parent)})" if isinstance(parent, dict) else " (it is no struct)"
            raise UserError(f"{where}: explode names {source!r}, but column {top!r} has no field {field!r}{fields}")
        feature, shown = parent[field], source
    if not isinstance(feature, (datasets.List, datasets.LargeList)):
        raise UserError(f"{where}: explode source {shown!r} is not a list column (it holds {feature}); explode "
                        "takes one list per problem, one item per trace")
    return feature.feature


def check_spec(features, spec: dict[str, str], where: str) -> None:
    """Refuse a spec whose sources are missing or not lists, and a `published_correct` that is not booleans."""
    import datasets

    for target, source in spec.items():
        item = source_feature(features, source, where)
        if target == PUBLISHED_CORRECT and not (isinstance(item, datasets.Value) and item.dtype == "bool"):
            raise UserError(f"{where}: {PUBLISHED_CORRECT} comes from {source!r}, which holds {item}, not "
                            "booleans (a published correctness flag per trace)")


def explode_lists(ds, spec: dict[str, str], prompt_template: str, where: str, path: Path):
    """One row per trace of each problem row of `ds` (which has a unique `id`), as the module docstring says."""
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    check_spec(ds.features, spec, where)
    dropped = {source_top(source, ds.column_names) for source in spec.values()}
    kept = [c for c in ds.column_names if c not in dropped]
    with_prompt = "problem" in ds.column_names
    if with_prompt and "prompt" in kept:
        raise UserError(f"{where}: the data has a `prompt` column and explode writes one (the chat messages, from "
                        "`problem`); rename it away, e.g. `columns: {prompt: source_prompt}`")
    features = datasets.Features({
        "id": ds.features["id"], "sample_idx": datasets.Value("int64"),
        **{c: ds.features[c] for c in kept if c != "id"},
        **({"prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}]}
           if with_prompt else {}),
        **{target: source_feature(ds.features, source, where) for target, source in spec.items()},
    })
    placeholders = [c for c in ds.column_names if "{" + c + "}" in prompt_template]
    first_target = next(iter(spec))

    def batches():
        for start, table in _arrow_batches(ds):
            lists = {target: _source_array(table, source) for target, source in spec.items()}
            lengths = {target: pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False)
                       for target, array in lists.items()}
            _check_lengths(table, lengths, spec, start, where)
            counts = lengths[first_target].astype(np.int64)
            parents = pa.array(np.repeat(np.arange(table.num_rows), counts))
            starts = np.r_[0, np.cumsum(counts)][:-1]
            within = np.arange(int(counts.sum())) - np.repeat(starts, counts)
            columns = {"id": table["id"].take(parents), "sample_idx": pa.array(within, pa.int64())}
            columns.update({c: table[c].take(parents) for c in kept if c != "id"})
            if with_prompt:
                rows = table.select(placeholders).to_pylist()
                prompts = pa.array([[{"role": "user", "content": render_prompt(prompt_template, row)}]
                                    for row in rows], features.arrow_schema.field("prompt").type)
                columns["prompt"] = prompts.take(parents)
            columns.update({target: pc.list_flatten(array) for target, array in lists.items()})
            yield pa.table(columns)

    return _write(batches(), features, path)


def _source_array(table, source: str):
    """A source's list array in an Arrow batch (`struct.field` read from the struct column)."""
    import pyarrow.compute as pc

    if source in table.column_names:
        array = table[source]
    else:
        top, _, field = source.partition(".")
        array = pc.struct_field(table[top].combine_chunks(), field)
    return array.combine_chunks() if hasattr(array, "combine_chunks") else array


def _check_lengths(table, lengths: dict, spec: dict[str, str], start: int, where: str) -> None:
    import numpy as np

    targets = list(lengths)
    first = lengths[targets[0]]
    unequal = np.zeros(len(first), dtype=bool)
    for target in targets[1:]:
        unequal |= lengths[target] != first
    if unequal.any():
        index = int(np.flatnonzero(unequal)[0])
        sizes = ", ".join(f"{spec[t]} has {int(lengths[t][index])}" for t in targets)
        raise UserError(f"{where}: row {start + index} (id {table['id'][index].as_py()!r}): explode's lists differ "
                        f"in length ({sizes}; a missing list counts as 0); each list holds one item per trace")


def from_conversations(ds, column: str, where: str, path: Path):
    """`prompt`, `completion` (and `problem` when absent) from each row's chat turns in `column`."""
    import datasets
    import pyarrow as pa

    if column not in ds.column_names:
        raise UserError(f"{where}: conversation column {column!r} is not in the data "
                        f"(columns: {', '.join(ds.column_names)})")
    for taken in ("prompt", "completion"):
        if taken in ds.column_names:
            raise UserError(f"{where}: the data has a {taken!r} column and `conversation` writes one; rename it "
                            f"away, e.g. `columns: {{{taken}: source_{taken}}}`")
    kept = [c for c in ds.column_names if c != column]
    add_problem = "problem" not in ds.column_names
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = datasets.Features({**{c: ds.features[c] for c in kept},
                                  **({"problem": datasets.Value("string")} if add_problem else {}),
                                  "prompt": [message], "completion": datasets.Value("string")})

    def batches():
        for start, table in _arrow_batches(ds):
            ids = table["id"].to_pylist() if "id" in table.column_names else [None] * table.num_rows
            parts = [_conversation(turns, where, start + i, ids[i], column)
                     for i, turns in enumerate(table[column].to_pylist())]
            columns = {c: table[c] for c in kept}
            if add_problem:
                columns["problem"] = pa.array([p[2] for p in parts], pa.string())
            columns["prompt"] = pa.array([p[0] for p in parts], features.arrow_schema.field("prompt").type)
            columns["completion"] = pa.array([p[1] for p in parts], pa.string())
            yield pa.table(columns)

    return _write(batches(), features, path)


def _conversation(turns, where: str, index: int, row_id, column: str) -> tuple[list[dict], str, str]:
    """(prompt messages, completion, last user turn) of one row's chat turns."""
    at = f"{where}: row {index}" + (f" (id {row_id!r})" if row_id is not None else "") + f", {column!r}"
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{at}: not a list of chat turns ({_kind(turns)})")
    messages = []
    for number, turn in enumerate(turns):
        role = turn.get("role") or turn.get("from") if isinstance(turn, dict) else None
        content = (turn.get("content") if turn.get("content") is not None else turn.get("value")) \
            if isinstance(turn, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise UserError(f"{at}: turn {number} is not {{from|role: user/assistant/system, value|content: text}} "
                            f"(it is {str(turn)[:80]})")
        messages.append({"role": ROLES[role], "content": content})
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    users = [m["content"] for m in messages[:last or 0] if m["role"] == "user"]
    if last is None or not users:
        raise UserError(f"{at}: needs a user turn and an assistant turn after it (roles: "
                        f"{', '.join(m['role'] for m in messages)})")
    return messages[:last], messages[last]["content"], users[-1]


def _kind(value) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def number_traces(ds, path: Path):
    """`sample_idx` for one trace per row: the row's place among the rows of its id (0 when ids are unique; an
    exploded problem found in several rows numbers its traces on across them)."""
    import datasets
    import pyarrow as pa

    seen: dict = {}
    others = [c for c in ds.column_names if c not in ("id", "sample_idx")]  # sample_idx is renumbered
    features = datasets.Features({"id": ds.features["id"], "sample_idx": datasets.Value("int64"),
                                  **{c: ds.features[c] for c in others}})

    def batches():
        for _, table in _arrow_batches(ds):
            ranks = []
            for row_id in table["id"].to_pylist():
                ranks.append(seen.get(row_id, 0))
                seen[row_id] = ranks[-1] + 1
            yield pa.table({"id": table["id"], "sample_idx": pa.array(ranks, pa.int64()),
                            **{c: table[c] for c in others}})

    return _write(batches(), features, path)


def _arrow_batches(ds):
    """(index of the first row, pyarrow Table) over `ds`, BATCH_ROWS rows at a time."""
    for number, table in enumerate(ds.with_format("arrow").iter(batch_size=BATCH_ROWS)):
        yield number * BATCH_ROWS, table


def _write(tables, features, path: Path):
    """The Arrow tables written to `path` (a scratch file) with `features` and memory-mapped back as a Dataset."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with ArrowWriter(features=features, path=str(path)) as writer:
        for table in tables:
            writer.write_table(table.select(list(features)))
        writer.finalize()
    return Dataset.from_file(str(path))
