"""The `kd` step on hand-made stored teacher distributions (builtin:tiny-random): the loss falls, TAID's t moves, a
student with another tokenizer is refused, and the collator lays the teacher at the right positions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.core.models import resolve_model
from pipeline.steps import kd
from pipeline.text import teacher_logprobs as stored
from pipeline.training.kd_trainer import KdCollator

K = 4


def student_identity():
    from transformers import AutoTokenizer

    return stored.tokenizer_identity(AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-random")), "teacher")


def teacher_rows(identity, count=6):
    """A teacher sure of a fixed continuation (90% on each next token), the rest of its top K spread thin."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        prompt = rng.integers(100, 5000, size=6).tolist()
        completion = [1000 + index, 2000, 3000 + index, 4000, 2]
        ids = [[token] + rng.integers(5000, 9000, size=K - 1).tolist() for token in completion]
        logprobs = [[np.log(0.9)] + [np.log(0.02)] * (K - 1) for _ in completion]
        rows.append({"id": f"r{index}", **stored.row_values(prompt, completion, ids, logprobs,
                                                            [np.log(0.9)] * len(completion), identity)})
    return rows


def saved(tmp_path, rows):
    features = Features({"id": Value("string"), **stored.features("float16")})
    Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "scored" / "data"))
    return {"scored": Artifact("scored", "dataset", tmp_path / "scored")}


def run_kd(tmp_path, inputs, **overrides):
    settings = {"uses": "kd", "input": "scored", "model": "builtin:tiny-random", "lora": None, "max_steps": 8,
                "batch_size": 3, "learning_rate": 3e-3, "lr_scheduler_type": "constant", "logging_steps": 1,
                "save_steps": 1000, "max_length": 64}
    cfg = kd.Config(**{**settings, **overrides})
    out = Output(name="kd", kind="model", dir=tmp_path / "kd", scratch=tmp_path / "kd_scratch", seed=0)
    return kd.run(cfg, inputs, out), out


def test_the_kd_loss_falls_on_stored_distributions(tmp_path):
    artifact, out = run_kd(tmp_path, saved(tmp_path, teacher_rows(student_identity())))
    stats = artifact.stats
    assert stats["steps"] == 8 and stats["k"] == K and stats["rows"] == 6
    assert stats["train_loss_last"] < 0.7 * stats["train_loss_first"]
    history = json.loads((out.dir / "log_history.json").read_text())
    assert all("kd/loss_per_token" in entry for entry in history if "loss" in entry)
    assert (out.model_dir / "config.json").exists()


def test_taid_moves_t_from_its_start(tmp_path):
    artifact, out = run_kd(tmp_path, saved(tmp_path, teacher_rows(student_identity())), objective="taid",
                           lora={"r": 8}, max_steps=4, taid_alpha=0.5)
    history = [entry["kd/taid_t"] for entry in json.loads((out.dir / "log_history.json").read_text())
               if "kd/taid_t" in entry]
    assert history[0] == pytest.approx(0.4) and history == sorted(history) and history[-1] > 0.4
    assert 0.4 < artifact.stats["taid_t_final"] <= 1.0


def test_a_student_with_another_tokenizer_is_refused(tmp_path):
    inputs = saved(tmp_path, teacher_rows("Qwen/Qwen2.5-Math-7B vocab-sha256:0123456789abcdef", count=2))
    with pytest.raises(UserError, match=r"student 'builtin:tiny-random vocab-sha256:.*teacher's tokenizer "
                                        r"'Qwen/Qwen2.5-Math-7B vocab-sha256:0123456789abcdef'"):
        run_kd(tmp_path, inputs)


def test_the_collator_aligns_the_teacher_with_the_labels():
    rows = [{"input_ids": [5, 6, 7, 8], "completion_start": 2, "teacher_topk_ids": [[7, 1], [8, 2]],
             "teacher_topk_logprobs": [[-0.1, -3.0], [-0.2, -2.0]]},
            {"input_ids": [5, 9, 10], "completion_start": 1, "teacher_topk_ids": [[9, 3], [10, 4]],
             "teacher_topk_logprobs": [[-0.3, -1.0], [-0.4, -1.5]]}]
    batch = KdCollator(pad_token_id=0, k=2)(rows)
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, 10, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    teacher = batch["teacher"]
    assert teacher.shape == (2, 4, 4)
    assert teacher[0, 2].tolist() == pytest.approx([7, 1, -0.1, -3.0])
    assert teacher[1, 2].tolist() == pytest.approx([10, 4, -0.4, -1.5])
    assert (teacher[0, :2] == 0).all() and (teacher[1, 3] == 0).all()
    assert torch.equal(teacher[..., 0][batch["labels"] != -100].long(), batch["labels"][batch["labels"] != -100])


def test_taid_resumes_with_the_t_it_had(tmp_path):
    inputs = saved(tmp_path, teacher_rows(student_identity()))
    settings = {"objective": "taid", "taid_alpha": 0.5, "save_steps": 2, "lora": {"r": 8}}
    first, out = run_kd(tmp_path, inputs, max_steps=2, **settings)
    checkpoint = json.loads((tmp_path / "kd_scratch" / "checkpoints" / "checkpoint-2" / "trainer_state.json")
                            .read_text())
    saved_t = checkpoint["stateful_callbacks"]["TaidStep"]["attributes"]["schedule"]["t"]
    assert saved_t == pytest.approx(first.stats["taid_t_final"], abs=1e-6) and saved_t > 0.4
    import shutil

    shutil.rmtree(out.dir)
    resumed, out = run_kd(tmp_path, inputs, max_steps=3, **settings)
    assert resumed.stats["resumed_from_step"] == 2
    history = [entry["kd/taid_t"] for entry in json.loads((out.dir / "log_history.json").read_text())
               if "kd/taid_t" in entry]
    assert history[-1] == pytest.approx(saved_t, abs=1e-6)  # step 3 trained at the t step 2 left, not at 0.4
