"""`kd` with `packing: true` (builtin:tiny-random): a packed batch's loss and gradients equal those of the same rows
unpacked, on the sdpa and eager attention paths; labels and position ids never cross a row boundary; the step trains
packed end to end."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.steps import kd
from pipeline.text import teacher_logprobs as stored
from pipeline.training.kd_packing import check_attention
from tests.test_kd import K, student_identity

# Rows of different prompt and completion lengths, so packing has to fit them around each other.
SHAPES = [(3, 9), (7, 4), (2, 12), (5, 6), (4, 3), (6, 8)]


def varied_rows(identity):
    rng = np.random.default_rng(1)
    rows = []
    for index, (prompt_length, completion_length) in enumerate(SHAPES):
        prompt = rng.integers(100, 5000, size=prompt_length).tolist()
        completion = rng.integers(100, 5000, size=completion_length).tolist() + [2]
        ids = [[token] + rng.integers(5000, 9000, size=K - 1).tolist() for token in completion]
        logprobs = np.log(rng.dirichlet(np.ones(K + 1), size=len(completion))[:, :K]).tolist()
        rows.append({"id": f"r{index}", **stored.row_values(prompt, completion, ids, logprobs,
                                                            [row[0] for row in logprobs], identity)})
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd_packing")
    features = Features({"id": Value("string"), **stored.features("float32")})
    Dataset.from_list(varied_rows(student_identity()), features=features).save_to_disk(str(root / "scored" / "data"))
    return {"scored": Artifact("scored", "dataset", root / "scored")}


@pytest.fixture(scope="module")
def trainers(tmp_path_factory, inputs):
    """The same rows unpacked and packed, each with its stats (built once: the weights are the same either way)."""
    root = tmp_path_factory.mktemp("kd_trainers")
    return trainer_for(root, inputs, "plain"), trainer_for(root, inputs, "packed", packing=True)


def trainer_for(tmp_path, inputs, name, **overrides):
    settings = {"uses": "kd", "input": "scored", "model": "builtin:tiny-random", "lora": None, "max_steps": 1,
                "batch_size": len(SHAPES), "save_steps": 1000, "max_length": 40, "temperature": 2.0,
                "nll_weight": 0.3}
    cfg = kd.Config(**{**settings, **overrides})
    out = Output(name=name, kind="model", dir=tmp_path / name, scratch=tmp_path / f"{name}_scratch", seed=0)
    return kd.build_trainer(cfg, inputs, out)


def loss_and_grads(trainer, attention: str):
    model = trainer.model
    model.set_attn_implementation(attention)
    model.train()
    model.zero_grad()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, batch


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_has_the_loss_and_gradients_of_its_rows_unpacked(trainers, attention):
    (plain, plain_stats), (packed, packed_stats) = trainers
    assert plain_stats["rows"] == packed_stats["rows"] == len(SHAPES)
    assert packed_stats["packed_sequences"] < len(SHAPES)  # rows did share sequences
    plain_loss, plain_grads, plain_batch = loss_and_grads(plain, attention)
    packed_loss, packed_grads, packed_batch = loss_and_grads(packed, attention)

    assert packed_batch["input_ids"].shape[0] == packed_stats["packed_sequences"]
    assert (plain_batch["labels"] != -100).sum() == (packed_batch["labels"] != -100).sum()
    assert torch.allclose(packed_loss, plain_loss, atol=1e-5, rtol=0), (packed_loss, plain_loss)
    assert plain_grads.keys() == packed_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_packed_labels_and_positions_stay_within_each_row(tmp_path, inputs):
    trainer, _ = trainer_for(tmp_path, inputs, "packed", packing=True, batch_size=2)
    sequences = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert sorted(n for s in sequences for n in s["seq_lengths"]) == sorted(p + c + 1 for p, c in SHAPES)
    assert all(len(s["input_ids"]) == sum(s["seq_lengths"]) <= 40 for s in sequences)
    batch = trainer.data_collator(sequences[:2])
    assert "attention_mask" in batch and batch["input_ids"].shape[1] == max(len(s["input_ids"]) for s in sequences[:2])
    rows_by_completion = {tuple(r[stored.COMPLETION_IDS]): r for r in varied_rows(student_identity())}
    for i, sequence in enumerate(sequences[:2]):
        offset = 0
        for length in sequence["seq_lengths"]:
            span = slice(offset, offset + length)
            assert batch["position_ids"][i, span].tolist() == list(range(length))
            labels = batch["labels"][i, span]
            assert labels[0] == -100  # the row's first token is never predicted from the row before it
            scored = (labels != -100).nonzero()[:, 0]
            completion = labels[scored].tolist()
            row = rows_by_completion[tuple(completion)]  # the scored tokens are exactly one row's completion
            assert int(scored[0]) == len(row[stored.PROMPT_IDS]) and int(scored[-1]) == length - 1
            assert batch["teacher"][i, span][scored, :K].long().tolist() == row[stored.TOPK_IDS]
            offset += length
        padding = batch["position_ids"][i, offset:]
        assert padding.tolist() == list(range(len(padding))) and (batch["labels"][i, offset:] == -100).all()
        assert (batch["attention_mask"][i, offset:] == 0).all() and (batch["attention_mask"][i, :offset] == 1).all()


def test_kd_trains_packed_rows_end_to_end(tmp_path, inputs):
    cfg = kd.Config(uses="kd", input="scored", model="builtin:tiny-random", lora={"r": 4}, max_steps=2,
                    batch_size=2, logging_steps=1, save_steps=1000, max_length=40, packing=True)
    out = Output(name="kd", kind="model", dir=tmp_path / "kd", scratch=tmp_path / "kd_scratch", seed=0)
    stats = kd.run(cfg, inputs, out).stats
    assert stats["steps"] == 2 and stats["rows"] == len(SHAPES) and stats["packed_sequences"] < len(SHAPES)
    assert stats["train_loss_first"] > 0


def test_packing_is_refused_where_attention_could_cross_rows():
    model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="paged|sdpa"))
    with pytest.raises(UserError, match=r"kd: packing needs .*attn_implementation='paged\|sdpa'"):
        check_attention(model)
