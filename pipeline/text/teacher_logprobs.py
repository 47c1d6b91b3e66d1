"""The stored teacher distributions: the columns `score` (and `sample` with `logprobs: K`) write and `kd` reads, the
teacher tokenizer's identity, and reading a row back as arrays.

Layout, one row per completion, T = the completion's token count, K = the top-K size (the same in every row):

    prompt_token_ids        list<int32>  [P]     the prompt as the teacher read it (chat template and think prefix
                                                 rendered, then tokenized)
    completion_token_ids    list<int32>  [T]     the completion's tokens, ending with eos where the completion ended
                                                 (finish_reason not "length")
    teacher_topk_ids        list<list<int32>>    [T][K]  the teacher's K most likely next tokens at each completion
                                                 position (given the prompt and the completion before it), most
                                                 likely first
    teacher_topk_logprobs   list<list<float16 | float32>>  [T][K]  their log-probs under the teacher at
                                                 temperature 1 (vLLM's raw log-probs), same order
    teacher_token_logprob   list<float32>  [T]   the log-prob of completion_token_ids[i] itself (in the top K or not)
    teacher_tokenizer       string               `tokenizer_identity` of the teacher's tokenizer

The tail (every token outside the top K) has mass 1 - sum(exp(teacher_topk_logprobs[i])); the KD loss
(`pipeline.training.kd_loss`) compares it as one bucket. float16 log-probs halve the largest column; they round a
log-prob to about 3 significant digits (a probability to about 0.1% of itself), far below the noise of a top-K
estimate of the teacher. Bytes per completion token, before Arrow's list offsets (4 bytes per list):
K * (4 + 2 or 4) + 4 + 4, e.g. K = 20 in float16: 128 bytes, plus 4 per list.

The tokenizer identity is "<name> vocab-sha256:<16 hex>", the hash over the tokenizer's token -> id table (special
tokens included): two tokenizers with the same table give the same ids to the same tokens, whatever they are called,
which is what reading a teacher's ids with a student needs (`same_vocabulary`).
"""

from __future__ import annotations

import hashlib
import json

from pipeline.core.errors import UserError

PROMPT_IDS, COMPLETION_IDS = "prompt_token_ids", "completion_token_ids"
TOPK_IDS, TOPK_LOGPROBS, TOKEN_LOGPROB, TOKENIZER = ("teacher_topk_ids", "teacher_topk_logprobs",
                                                     "teacher_token_logprob", "teacher_tokenizer")
TEACHER_COLUMNS = (PROMPT_IDS, COMPLETION_IDS, TOPK_IDS, TOPK_LOGPROBS, TOKEN_LOGPROB, TOKENIZER)
LOGPROB_DTYPES = ("float16", "float32")


def features(logprob_dtype: str = "float16") -> dict:
    """The columns' `datasets` feature types (a dict to merge into a dataset's Features)."""
    from datasets import List, Value

    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"teacher log-probs are stored as {' or '.join(LOGPROB_DTYPES)}, not {logprob_dtype}")
    return {PROMPT_IDS: List(Value("int32")), COMPLETION_IDS: List(Value("int32")),
            TOPK_IDS: List(List(Value("int32"))), TOPK_LOGPROBS: List(List(Value(logprob_dtype))),
            TOKEN_LOGPROB: List(Value("float32")), TOKENIZER: Value("string")}


def tokenizer_identity(tokenizer, name: str | None = None) -> str:
    """'<name> vocab-sha256:<16 hex>' of a transformers tokenizer (name: the model reference, else its own)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
    return f"{name or tokenizer.name_or_path} vocab-sha256:{digest}"


def model_identity(model_path: str, name: str) -> str:
    """`tokenizer_identity` of the tokenizer in a model dir (or hub id), under the name the recipe gave it."""
    from transformers import AutoTokenizer

    return tokenizer_identity(AutoTokenizer.from_pretrained(model_path), name)


def same_vocabulary(identity_a: str, identity_b: str) -> bool:
    """Whether two `tokenizer_identity` strings have the same token table (their names may differ)."""
    return identity_a.rsplit(" ", 1)[-1] == identity_b.rsplit(" ", 1)[-1]


def row_values(prompt_ids, completion_ids, topk_ids, topk_logprobs, token_logprobs, identity: str) -> dict:
    """One row's columns from per-position sequences (checked: one top-K entry and one log-prob per completion
    token, the same K everywhere)."""
    length = len(completion_ids)
    if not (len(topk_ids) == len(topk_logprobs) == len(token_logprobs) == length):
        raise ValueError(f"{length} completion tokens but {len(topk_ids)} top-K id lists, {len(topk_logprobs)} "
                         f"log-prob lists and {len(token_logprobs)} token log-probs")
    return {PROMPT_IDS: list(prompt_ids), COMPLETION_IDS: list(completion_ids), TOPK_IDS: [list(i) for i in topk_ids],
            TOPK_LOGPROBS: [list(lp) for lp in topk_logprobs], TOKEN_LOGPROB: list(token_logprobs),
            TOKENIZER: identity}


def check_dataset(dataset, *, step: str, source: str) -> tuple[int, str]:
    """(K, the teacher tokenizer's identity) of a dataset with the teacher columns; UserError naming the dataset,
    the column and the row when a column is missing, the per-token lists disagree in length, K differs between
    positions, or the rows name different teacher tokenizers. Checked column-wise with pyarrow, one batch of rows at
    a time."""
    import numpy as np
    import pyarrow.compute as pc

    missing = [column for column in TEACHER_COLUMNS if column not in dataset.column_names]
    if missing:
        raise UserError(f"{step}: dataset {source!r} has no column(s) {missing}: it needs the teacher's stored "
                        "distributions, as a `score` step (or `sample` with `logprobs: K`) writes them")
    if len(dataset) == 0:
        raise UserError(f"{step}: dataset {source!r} has no rows")
    k, identity = None, None

    def where(row: int) -> str:
        row_id = dataset[row]["id"] if "id" in dataset.column_names else f"row {row}"
        return f"{step}: row {row_id!r} of dataset {source!r}"

    for first in range(0, len(dataset), 2_000):
        batch = dataset.select_columns(list(TEACHER_COLUMNS[1:])).with_format("arrow")[first:first + 2_000]
        lengths = pc.list_value_length(batch[COMPLETION_IDS]).to_numpy(zero_copy_only=False)
        for column in (TOPK_IDS, TOPK_LOGPROBS, TOKEN_LOGPROB):
            other = pc.list_value_length(batch[column]).to_numpy(zero_copy_only=False)
            wrong = np.flatnonzero(other != lengths)
            if len(wrong):
                row = int(wrong[0])
                raise UserError(f"{where(first + row)}: {lengths[row]} completion tokens but {other[row]} entries in "
                                f"column {column!r}")
        for column in (TOPK_IDS, TOPK_LOGPROBS):
            widths = pc.list_value_length(pc.list_flatten(batch[column])).to_numpy(zero_copy_only=False)
            if len(widths):
                k = int(widths[0]) if k is None else k
                odd = np.flatnonzero(widths != k)
                if len(odd):
                    row = int(np.searchsorted(np.cumsum(lengths), odd[0], side="right"))
                    raise UserError(f"{where(first + row)}: column {column!r} has a top-K list of "
                                    f"{widths[odd[0]]} entries where others have {k}; every position needs the same K")
        names = pc.unique(batch[TOKENIZER]).to_pylist()
        for name in names:
            if identity is not None and name != identity:
                row = int(np.flatnonzero(pc.equal(batch[TOKENIZER], name).to_numpy(zero_copy_only=False))[0])
                raise UserError(f"{where(first + row)}: column {TOKENIZER!r} names {name!r}, an earlier row "
                                f"{identity!r}; one dataset must hold one teacher's distributions")
            identity = name
    if not k:
        raise UserError(f"{step}: dataset {source!r} has no completion tokens with teacher log-probs")
    return k, identity


def row_arrays(row: dict):
    """(prompt ids, completion ids, top-K ids [T, K] int64, top-K log-probs [T, K] float32, token log-probs [T]) of
    one row, as numpy arrays."""
    import numpy as np

    k = len(row[TOPK_IDS][0]) if row[TOPK_IDS] else 0
    return (np.asarray(row[PROMPT_IDS], dtype=np.int64), np.asarray(row[COMPLETION_IDS], dtype=np.int64),
            np.asarray(row[TOPK_IDS], dtype=np.int64).reshape(-1, k),
            np.asarray(row[TOPK_LOGPROBS], dtype=np.float32).reshape(-1, k),
            np.asarray(row[TOKEN_LOGPROB], dtype=np.float32))


def bytes_per_token(k: int, logprob_dtype: str = "float16") -> int:
    """Stored bytes per completion token in the data buffers (list offsets not counted): K ids, K log-probs, the
    token's own id and log-prob."""
    return k * (4 + (2 if logprob_dtype == "float16" else 4)) + 4 + 4


def arrow_columns(prompts, completions, topk_ids, topk_logprobs, token_logprobs, identity: str,
                  logprob_dtype: str = "float16") -> dict:
    """The columns as Arrow arrays of the layout's types, one entry per row: prompt and completion token ids, the
    top-K ids [T, K] and log-probs [T, K] and the token log-probs [T] (array-likes), built from flat numpy buffers
    (no Python object per token)."""
    import numpy as np
    import pyarrow as pa

    def offsets(lengths):
        return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))

    def flat(arrays, numpy_type):
        arrays = [np.asarray(a, dtype=numpy_type).reshape(-1) for a in arrays]
        return np.concatenate(arrays) if arrays else np.zeros(0, numpy_type)

    def ids_list(sequences):
        return pa.ListArray.from_arrays(offsets([len(s) for s in sequences]), pa.array(flat(sequences, np.int32)))

    lengths = [len(values) for values in token_logprobs]
    k = next((np.shape(ids)[1] for ids in topk_ids if len(ids)), 1)
    float_type = pa.float16() if logprob_dtype == "float16" else pa.float32()

    def nested(arrays, value_type, numpy_type):
        values = flat(arrays, numpy_type)
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, k, dtype=np.int32)),
                                         pa.array(values, value_type))
        return pa.ListArray.from_arrays(offsets(lengths), inner)

    return {
        PROMPT_IDS: ids_list(prompts),
        COMPLETION_IDS: ids_list(completions),
        TOPK_IDS: nested(topk_ids, pa.int32(), np.int32),
        TOPK_LOGPROBS: nested(topk_logprobs, float_type, np.dtype(logprob_dtype)),
        TOKEN_LOGPROB: pa.ListArray.from_arrays(offsets(lengths), pa.array(flat(token_logprobs, np.float32))),
        TOKENIZER: pa.array([identity] * len(lengths), pa.string()),
    }


def measured_bytes_per_token(columns: dict, tokens: int) -> float | None:
    """Bytes per completion token of the per-token columns as written (Arrow buffers, list offsets included)."""
    per_token = (COMPLETION_IDS, TOPK_IDS, TOPK_LOGPROBS, TOKEN_LOGPROB)
    return round(sum(columns[name].nbytes for name in per_token) / tokens, 1) if tokens else None


def dataset_stats(dataset, logprob_dtype: str) -> dict:
    """A manifest's record of a dataset's stored distributions: the storage type, the tokenizer, completion tokens and
    bytes per completion token."""
    tokens = sum(len(ids) for ids in dataset[COMPLETION_IDS])
    identities = set(dataset[TOKENIZER])
    return {"logprob_dtype": logprob_dtype, "teacher_tokenizer": identities.pop() if len(identities) == 1 else None,
            "scored_tokens": tokens, "bytes_per_token": measured_bytes_per_token(
                {name: dataset.data.column(name) for name in TEACHER_COLUMNS}, tokens)}
