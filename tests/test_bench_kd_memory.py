"""`distill bench train --kd-lengths`: its rows, the full-logit KD baseline's dense teacher and loss (fast), and the
benchmark itself on the tiny model (slow: two training processes)."""

import json

import numpy as np
import pytest
import torch
from trl.experimental.gkd import GKDTrainer

from pipeline.commands.bench.kd_memory import PROMPT_TOKENS, TOP_K, dense_teacher_logprobs, stored_rows
from pipeline.commands.cli import main
from pipeline.text import teacher_logprobs as stored
from pipeline.training.kd_loss import pack_teacher, topk_kd_position_loss


def test_rows_fill_the_length_with_a_top_k_per_completion_token():
    rows = stored_rows(2, 200, vocab_size=1000, identity="m vocab-sha256:0")
    for row in rows:
        completion = row[stored.COMPLETION_IDS]
        assert len(row[stored.PROMPT_IDS]) == PROMPT_TOKENS and PROMPT_TOKENS + len(completion) == 200
        assert len(row[stored.TOPK_IDS]) == len(completion) and {len(ids) for ids in row[stored.TOPK_IDS]} == {TOP_K}
        assert [ids[0] for ids in row[stored.TOPK_IDS]] == completion
        mass = np.exp(np.array(row[stored.TOPK_LOGPROBS])).sum(1)
        assert (mass < 1).all() and (mass > 0).all()  # some mass left to the tail
    assert rows[0][stored.COMPLETION_IDS] != rows[1][stored.COMPLETION_IDS]


def test_the_dense_teacher_keeps_the_top_k_and_spreads_the_tail():
    vocab, k = 50, 4
    generator = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(6)]).view(2, 3, k)
    logprobs = torch.log(torch.tensor([0.5, 0.2, 0.1, 0.05])).expand(2, 3, k)
    dense = dense_teacher_logprobs(pack_teacher(ids, logprobs), vocab)
    assert dense.shape == (2, 3, vocab)
    assert torch.allclose(dense.exp().sum(-1), torch.ones(2, 3), atol=1e-6)
    assert torch.allclose(dense.gather(-1, ids), logprobs)
    others = dense.exp().clone().scatter_(-1, ids, 0.0)
    assert torch.allclose(others.sum(-1), torch.full((2, 3), 0.15), atol=1e-6)


def test_full_logit_kd_is_at_least_the_top_k_bucket_kl():
    """The baseline's loss (TRL's GKD loss, beta 0, on the dense teacher) is forward KL over the whole vocabulary;
    merging the tail into one bucket can only lower a KL, and it equals ours where the student's tail is flat too."""
    vocab, k = 64, 5
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(7, vocab, generator=generator)
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(7)])
    logprobs = torch.log_softmax(torch.randn(7, k + 1, generator=generator), -1)[:, :k]
    context = pack_teacher(ids, logprobs)
    ours = topk_kd_position_loss(logits, ids[:, 0], context)
    labels = torch.zeros(1, 7, dtype=torch.long)
    teacher = dense_teacher_logprobs(context, vocab)[None]
    full = GKDTrainer.generalized_jsd_loss(logits[None], teacher, labels=labels, beta=0.0, reduction="none").sum(-1)
    assert (full >= ours - 1e-5).all() and (full > ours + 1e-3).any()
    # a student whose tail is flat as the dense teacher's: nothing is lost by merging it
    flat = torch.full_like(logits, -1.0).scatter_(-1, ids, logits.gather(-1, ids))
    full_flat = GKDTrainer.generalized_jsd_loss(flat[None], teacher, labels=labels, beta=0.0, reduction="none").sum(-1)
    assert torch.allclose(full_flat, topk_kd_position_loss(flat, ids[:, 0], context), atol=1e-5)


@pytest.mark.slow
def test_kd_memory_benchmark_measures_both_cases(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--kd-lengths", "512", "--model", "builtin:tiny-random", "--steps", "1",
                 "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    measured = results["train"]["kd_memory"]
    assert measured["k"] == TOP_K and measured["lengths"] == [512]
    cases = {case["case"]: case for case in measured["cases"]}
    assert set(cases) == {"kd", "full_logit_kd"}
    for case in cases.values():
        assert case["steps"] == 1 and case["length"] == 512 and case["loss_first"] > 0
        assert case["peak_rss_gib"] >= case["peak_rss_above_baseline_gib"] > 0
    ratio = measured["kd_mem_ratio_by_length"]["512"]
    above = {name: case["peak_rss_above_baseline_gib"] for name, case in cases.items()}
    assert ratio == round(above["kd"] / above["full_logit_kd"], 3)
    assert results["redi_mem_ratio"] is None and results["sft_packing_speedup"] is None
