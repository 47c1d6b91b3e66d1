"""The stored teacher-distribution columns (pipeline.text.teacher_logprobs): a round trip through a saved dataset,
the Arrow types, the tokenizer identity, and the checks that name a bad row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from datasets import Dataset, Features, Value, load_from_disk

from pipeline.core.errors import UserError
from pipeline.text import teacher_logprobs as tl


def sample_rows(k=3, dtype="float16"):
    rng = np.random.default_rng(0)
    rows = []
    for index, length in enumerate((4, 1, 6)):
        logprobs = np.sort(np.log(rng.dirichlet(np.ones(k + 2), size=length))[:, :k], axis=1)[:, ::-1]
        rows.append({"id": f"p{index}", **tl.row_values(
            prompt_ids=rng.integers(0, 50_000, size=5), completion_ids=rng.integers(0, 50_000, size=length),
            topk_ids=rng.integers(0, 50_000, size=(length, k)), topk_logprobs=logprobs,
            token_logprobs=logprobs[:, 0] - 0.5, identity="teacher vocab-sha256:0123456789abcdef")})
    return rows


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_through_a_saved_dataset(tmp_path, dtype):
    rows = sample_rows()
    features = Features({"id": Value("string"), **tl.features(dtype)})
    Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "data"))
    back = load_from_disk(str(tmp_path / "data"))
    schema = back.data.schema
    assert schema.field(tl.TOPK_IDS).type == pa.list_(pa.list_(pa.int32()))
    assert schema.field(tl.TOPK_LOGPROBS).type == pa.list_(pa.list_(getattr(pa, dtype)()))
    assert schema.field(tl.TOKEN_LOGPROB).type == pa.list_(pa.float32())
    assert tl.check_dataset(back, step="kd", source="scored") == (3, "teacher vocab-sha256:0123456789abcdef")
    for row, stored in zip(rows, back):
        prompt, completion, ids, logprobs, token = tl.row_arrays(stored)
        np.testing.assert_array_equal(prompt, row[tl.PROMPT_IDS])
        np.testing.assert_array_equal(completion, row[tl.COMPLETION_IDS])
        np.testing.assert_array_equal(ids, np.asarray(row[tl.TOPK_IDS]))
        expected = np.asarray(row[tl.TOPK_LOGPROBS], dtype=getattr(np, dtype)).astype(np.float32)
        np.testing.assert_array_equal(logprobs, expected)  # float16: exactly the rounded value, nothing else lost
        np.testing.assert_array_equal(token, np.asarray(row[tl.TOKEN_LOGPROB], dtype=np.float32))
        assert ids.shape == logprobs.shape == (len(completion), 3)


def test_bytes_per_token():
    assert tl.bytes_per_token(20, "float16") == 128
    assert tl.bytes_per_token(1, "float32") == 16


def test_checks_name_the_row_and_column():
    rows = sample_rows()
    rows[1][tl.TOPK_IDS] = rows[1][tl.TOPK_IDS] + [[1, 2, 3]]
    with pytest.raises(UserError, match=r"row 'p1' of dataset 'scored': 1 completion tokens but 2 entries in column "
                                        "'teacher_topk_ids'"):
        tl.check_dataset(Dataset.from_list(rows), step="kd", source="scored")
    rows = sample_rows()
    rows[2][tl.TOPK_LOGPROBS][3] = [-0.1, -0.2]  # one position with K = 2 among K = 3
    with pytest.raises(UserError, match=r"row 'p2' of dataset 'scored': column 'teacher_topk_logprobs' has a top-K "
                                        "list of 2 entries where others have 3"):
        tl.check_dataset(Dataset.from_list(rows), step="kd", source="scored")
    rows = sample_rows()
    rows[2][tl.TOKENIZER] = "other vocab-sha256:ffffffffffffffff"
    with pytest.raises(UserError, match="one teacher"):
        tl.check_dataset(Dataset.from_list(rows), step="kd", source="scored")
    with pytest.raises(UserError, match=r"no column\(s\) \['teacher_topk_ids'"):
        tl.check_dataset(Dataset.from_list(rows).remove_columns([tl.TOPK_IDS]), step="kd", source="scored")
    with pytest.raises(ValueError, match="2 completion tokens but 1 top-K"):
        tl.row_values([1], [1, 2], [[3]], [[-0.1]], [-0.1, -0.2], "x")


def test_tokenizer_identity_is_the_token_table():
    from transformers import AutoTokenizer

    from pipeline.core.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-random", {}))
    identity = tl.tokenizer_identity(tokenizer, "builtin:tiny-random")
    assert identity.startswith("builtin:tiny-random vocab-sha256:")
    assert tl.same_vocabulary(identity, tl.tokenizer_identity(tokenizer, "another name"))
    tokenizer.add_tokens(["<brand-new-token>"])
    assert not tl.same_vocabulary(identity, tl.tokenizer_identity(tokenizer))
