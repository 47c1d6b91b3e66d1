"""`distill bench train --kd-lengths 512,1024,2048`: peak memory of a `kd` training step (our chunked top-K loss,
K = 20) against a full-logit KD step, one length at a time.

- `kd`: the `kd` step's own trainer (`pipeline.steps.kd.build_trainer`): the student's full-vocabulary logits exist
  for 1,024 positions at a time, and the teacher is its stored top-K ids and log-probs, [length, 2K] floats.
- `full_logit_kd`: the same trainer, data, batch and optimizer, but the loss as a naive implementation or TRL's GKD
  holds it: the student's ordinary forward gives full-vocabulary logits of the whole sequence [length, V], the
  teacher is a dense distribution over the vocabulary at every position [length, V] (here built from the stored
  top-K, the tail mass spread evenly over the other tokens, as a teacher forward would hand over its logits), and
  the loss is TRL's `GKDTrainer.generalized_jsd_loss` with beta 0 (forward KL(teacher || student), masked to the
  completion tokens).

Rows: a 64-token prompt and a completion filling the rest of `length` (one row per step, batch 1), random token ids
and a random top-K per completion token, stored as `score` stores them (float16 log-probs). Full fine-tuning, as
the REDI sweep (`bench train --lengths`). Each case runs in its own process; peak memory is measured as there:
process peak RSS raw and above the process's baseline (its peak RSS once torch, transformers, TRL and the data are
loaded, just before the model), and the CUDA peak allocation on a GPU. The ratio kd / full-logit KD is of CUDA peak
on a GPU, else of RSS above baseline.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.commands.bench import child_main, memory_sweep, train_measured

CASES = ("kd", "full_logit_kd")
TOP_K = 20
PROMPT_TOKENS = 64


def stored_rows(count: int, length: int, vocab_size: int, identity: str, k: int = TOP_K, seed: int = 0) -> list[dict]:
    """Rows of stored teacher distributions whose prompt + completion is exactly `length` tokens: random ids, a
    random top-K (the completion token first) per completion token."""
    import numpy as np

    from pipeline.text import teacher_logprobs as stored

    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        prompt = rng.integers(0, vocab_size, size=PROMPT_TOKENS).tolist()
        completion = rng.integers(0, vocab_size, size=length - PROMPT_TOKENS).tolist()
        ids = np.concatenate([np.array(completion)[:, None], rng.integers(0, vocab_size, size=(len(completion), k - 1))],
                             axis=1).tolist()
        # Top-K probabilities, descending, leaving some mass to the tail.
        probs = -np.sort(-rng.dirichlet(np.ones(k + 1), size=len(completion))[:, :k], axis=1)
        logprobs = np.log(probs).tolist()
        rows.append({"id": f"kd{index}", **stored.row_values(prompt, completion, ids, logprobs,
                                                             [row[0] for row in logprobs], identity)})
    return rows


def dense_teacher_logprobs(teacher, vocab_size: int):
    """The stored top-K [..., 2K] (`kd_loss.pack_teacher`) as a dense [..., V] log-distribution: the top-K log-probs at
    their ids, the tail mass spread evenly over the other V - K tokens (what a full-logit KD holds)."""

    k = teacher.shape[-1] // 2
    ids, logprobs = teacher[..., :k].long(), teacher[..., k:]
    tail = (1.0 - logprobs.exp().sum(-1, keepdim=True)).clamp(min=1e-8) / (vocab_size - k)
    dense = tail.log().expand(*teacher.shape[:-1], vocab_size).clone()
    return dense.scatter_(-1, ids, logprobs)


def full_logit_kd_trainer(trainer, vocab_size: int):
    """`trainer` (a KdTrainer) with its loss replaced by full-logit forward KL (TRL's GKD loss, beta 0)."""
    import types

    import torch
    from trl.experimental.gkd import GKDTrainer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        with torch.no_grad():
            teacher = dense_teacher_logprobs(inputs["teacher"], vocab_size)
        loss = GKDTrainer.generalized_jsd_loss(logits[:, :-1], teacher[:, 1:], labels=inputs["labels"][:, 1:], beta=0.0,
                                               num_items_in_batch=num_items_in_batch)
        return (loss, logits) if return_outputs else loss

    trainer.compute_loss = types.MethodType(compute_loss, trainer)
    return trainer


def run_case(spec: dict) -> dict:
    """Train one case for `steps` optimizer steps in this process; its peak memory and time."""
    import resource

    import datasets
    import torch
    import trl  # noqa: F401 -- imported before the baseline is read, as every case needs it
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 -- likewise
    from trl.experimental.gkd import GKDTrainer  # noqa: F401 -- likewise

    from pipeline.core.artifacts import Artifact, Output
    from pipeline.core.models import resolve_model
    from pipeline.steps import kd
    from pipeline.text import teacher_logprobs as stored

    case, workdir, length = spec["case"], Path(spec["workdir"]), spec["length"]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec["model"]))
    vocab_size = len(tokenizer)
    rows = stored_rows(spec["steps"], length, vocab_size, stored.tokenizer_identity(tokenizer, spec["model"]))
    features = datasets.Features({"id": datasets.Value("string"), **stored.features("float16")})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(workdir / "scored" / "data"))
    inputs = {"scored": Artifact("scored", "dataset", workdir / "scored")}
    out = Output(name=case, kind="model", dir=workdir / case, scratch=workdir / "scratch", seed=0)
    cfg = kd.Config(uses="kd", input="scored", model=spec["model"], lora=None, learning_rate=1e-6,
                    max_steps=spec["steps"], batch_size=1, logging_steps=1, save_steps=10_000, max_length=length,
                    gradient_checkpointing=spec.get("gradient_checkpointing", False))
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    trainer = kd.build_trainer(cfg, inputs, out)[0]
    if case == "full_logit_kd":
        trainer = full_logit_kd_trainer(trainer, trainer.model.config.vocab_size)
    seconds, peak_kib = train_measured(trainer)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "case": case, "model": spec["model"], "length": length, "k": TOP_K, "vocab_size": vocab_size,
        "steps": trainer.state.global_step,
        "seconds_per_step": round(seconds / max(trainer.state.global_step, 1), 3),
        "loss_first": losses[0] if losses else None,
        "peak_rss_gib": round(peak_kib / 2**20, 3),
        "baseline_rss_gib": round(baseline_kib / 2**20, 3),
        "peak_rss_above_baseline_gib": round((peak_kib - baseline_kib) / 2**20, 3),
        "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
    }


def run(opts, console) -> tuple[dict, dict]:
    """kd vs full-logit KD at each of opts.kd_lengths: peak memory and their ratio (no headline)."""
    from rich.table import Table

    checkpointing = ", gradient checkpointing" if opts.gradient_checkpointing else ""
    results, memory_key, ratios = memory_sweep(
        "pipeline.commands.bench.kd_memory", CASES, opts.kd_lengths, console,
        lambda length: f"{length} tokens ({opts.model}, {opts.steps} steps, batch 1, K {TOP_K}{checkpointing})",
        lambda case, length: {"case": case, "model": opts.model, "steps": opts.steps, "length": length,
                              "gradient_checkpointing": opts.gradient_checkpointing})
    table = Table(title=f"distill bench train --kd-lengths — {opts.model}, {opts.steps} steps, batch 1, K {TOP_K}, "
                        f"full fine-tuning{checkpointing}")
    for column in ("tokens", "kd peak RSS", "kd above base", "full-logit peak RSS", "full-logit above base",
                   "kd / full", "kd s/step", "full s/step"):
        table.add_column(column, justify="right", no_wrap=True)
    for length in opts.kd_lengths:
        ours, full = results["kd"][length], results["full_logit_kd"][length]
        table.add_row(str(length), f"{ours['peak_rss_gib']:.2f}", f"{ours['peak_rss_above_baseline_gib']:.2f}",
                      f"{full['peak_rss_gib']:.2f}", f"{full['peak_rss_above_baseline_gib']:.2f}",
                      f"{ratios[length]:.3f}", f"{ours['seconds_per_step']:.1f}", f"{full['seconds_per_step']:.1f}")
    console.print(table)
    raw = {"kd_memory": {"steps": opts.steps, "batch_size": 1, "k": TOP_K, "lengths": opts.kd_lengths,
                         "memory": memory_key, "gradient_checkpointing": opts.gradient_checkpointing,
                         "kd_mem_ratio_by_length": ratios,
                         "cases": [result for by_length in results.values() for result in by_length.values()]}}
    return raw, {"sft_packing_speedup": None, "redi_mem_ratio": None}


if __name__ == "__main__":
    child_main({case: run_case for case in CASES})
