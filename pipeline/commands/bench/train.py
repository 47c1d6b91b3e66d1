"""`distill bench train`: what the training steps cost, measured side by side on this machine.

- SFT on conversations whose completion lengths are log-normal, like distilled reasoning traces (most short, a
  long tail up to max_length): trained (non-padding) tokens per second with padded batches, packing, and
  padding-free batches.
- REDI against TRL's DPO with a reference model, full fine-tuning on the same pairs, batch and steps: peak memory and
  seconds per step. REDI loads no reference model, so it should need about one model copy less. Peak memory is
  reported raw (process peak RSS; CUDA peak allocation on a GPU) and above the process's baseline: its peak RSS
  once torch, transformers, TRL and the data are loaded, just before the model is (imports are common to both cases
  and are not training memory).
- With `--lengths 512,1024,...`, instead: REDI against TRL's DPO with a reference model on long pairs, one length at
  a time: pairs whose chosen and rejected sequences (prompt + completion) are each about that many tokens, batch 1
  (2 sequences per forward), full fine-tuning. Per length, each one's peak memory and their ratio; from all lengths,
  the longest pair each could train within `MEMORY_BUDGET_GIB` of process RSS, interpolated between the measured
  lengths around it or, when every measured one fits, extrapolated along the line through the two longest (memory
  grows linearly with the length once the attention is memory-efficient). `--gradient-checkpointing` trains every
  case with it.
- With `--kd-lengths 512,1024,...`, instead: a `kd` step (chunked top-K loss, K = 20) against a full-logit KD step,
  peak memory per length (`pipeline.commands.bench.kd_memory`).

Each case runs in its own process so one case's peak memory never shows in another's.
"""

from __future__ import annotations

import math
import random
import statistics
import tempfile
from pathlib import Path

from pipeline.commands.bench import child_main, memory_sweep, run_child, train_measured

CASES = ("redi", "dpo_with_reference", "sft_padded", "sft_packed", "sft_padding_free")
SWEEP_CASES = ("redi", "dpo_with_reference")
MEMORY_BUDGET_GIB = 20  # the sweep's question: the longest pair each could train within this much process RSS
SWEEP_TARGET_FROM = 2048  # the sweep's headline ratio is the worst at this many tokens and more (the target)
# Completion tokens ~ log-normal(median 150, sigma 1): p10 ~40, p90 ~540, p99 ~1,500 before the cap at max_length.
# Real traces span ~100 to many thousands of tokens with the same long-tailed shape, scaled up.
MEDIAN_TOKENS = 150
SIGMA = 1.0
PROMPT_ROOM = 64  # tokens left for the prompt, the answer line and the chat template
FIXED_LENGTH_MARGIN = 4  # tokens a fixed-length pair leaves unused: its numbers may take a token more than measured
WORDS = ("then", "add", "the", "next", "digit", "and", "carry", "one", "so", "we", "check", "it", "again")


def skewed_rows(count: int, max_length: int, seed: int = 0) -> list[dict]:
    """Arithmetic pairs whose chosen and rejected completions have independent log-normal lengths (in words, about
    one token each), capped so that every row fits in max_length."""
    return arithmetic_pairs(count, lambda rng: min(max_length - PROMPT_ROOM, max(
        4, round(rng.lognormvariate(math.log(MEDIAN_TOKENS), SIGMA)))), seed)


def fixed_length_rows(count: int, tokens: int, tokenizer, seed: int = 0) -> list[dict]:
    """Arithmetic pairs whose chosen and rejected sequences (prompt + completion in `tokenizer`'s chat template) are
    each a little under `tokens` tokens: the reasoning gets the tokens a pair without reasoning leaves, less
    FIXED_LENGTH_MARGIN (each of WORDS is one token in SmolLM2's tokenizer; the numbers' digits vary). Measured, not
    assumed: a template one token longer made every row too long for max_length, and the sweep trained nothing."""

    def length(row: dict) -> int:
        return max(len(tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True,
                                                     return_dict=True)["input_ids"]) for side in ("chosen", "rejected"))

    frame = length(arithmetic_pairs(1, lambda rng: 0, seed)[0])
    return arithmetic_pairs(count, lambda rng: tokens - frame - FIXED_LENGTH_MARGIN, seed)


def arithmetic_pairs(count: int, reasoning_words, seed: int) -> list[dict]:
    """Pairs of a right and a wrong answer to `a + b`, each after `reasoning_words(rng)` words of reasoning."""
    rng = random.Random(seed)

    def reasoning() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(reasoning_words(rng)))

    rows = []
    for i in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        rows.append({
            "id": f"b{i}",
            "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "chosen": [{"role": "assistant", "content": f"{reasoning()}. {a} + {b} = {a + b}. \\boxed{{{a + b}}}"}],
            "rejected": [{"role": "assistant",
                          "content": f"{reasoning()}. {a} + {b} = {a + b + 1}. \\boxed{{{a + b + 1}}}"}],
        })
    return rows


def run_case(spec: dict) -> dict:
    """Train one case for `steps` optimizer steps in this process; its time, throughput and peak memory."""
    import resource

    import datasets
    import torch
    import trl  # noqa: F401 -- imported before the baseline is read, as every case needs it
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 -- likewise

    from pipeline.core.artifacts import Artifact, Output
    from pipeline.core.models import resolve_model
    from pipeline.steps import redi, sft

    case, workdir = spec["case"], Path(spec["workdir"])
    if spec.get("fixed_length"):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec["model"]))
        data = fixed_length_rows(spec["rows"], spec["max_length"], tokenizer)
    else:
        data = skewed_rows(spec["rows"], spec["max_length"])
    datasets.Dataset.from_list(data).save_to_disk(str(workdir / "pairs" / "data"))
    datasets.Dataset.from_list([{"id": r["id"], "messages": r["prompt"] + r["chosen"]} for r in data]).save_to_disk(
        str(workdir / "sft_data" / "data"))
    inputs = {"pairs": Artifact("pairs", "dataset", workdir / "pairs"),
              "sft_data": Artifact("sft_data", "dataset", workdir / "sft_data")}
    out = Output(name=case, kind="model", dir=workdir / case, scratch=workdir / "scratch", seed=0)
    common = dict(model=spec["model"], max_steps=spec["steps"], batch_size=spec["batch_size"], logging_steps=1,
                  save_steps=10_000, max_length=spec["max_length"],
                  gradient_checkpointing=spec.get("gradient_checkpointing", False))
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    if case in ("redi", "dpo_with_reference"):
        cfg = redi.Config(uses="redi", input="pairs", lora=None, learning_rate=1e-6, **common)
        trainer = redi.build_trainer(cfg, inputs, out)[0] if case == "redi" else dpo_trainer(cfg, inputs, out)
        row_tokens = [len(row["prompt_ids"]) + len(row[side]) for row in trainer.train_dataset
                      for side in ("chosen_ids", "rejected_ids")]  # each sequence of a pair
    else:
        cfg = sft.Config(uses="sft", input="sft_data", lora=None, learning_rate=1e-5, packing=case == "sft_packed",
                         padding_free=case == "sft_padding_free", **common)
        trainer = sft.build_trainer(cfg, inputs, out)[0]
        row_tokens = None if cfg.packing else [len(ids) for ids in trainer.train_dataset["input_ids"]]
    seconds, peak_kib = train_measured(trainer)
    return {
        "case": case,
        "model": spec["model"],
        "steps": trainer.state.global_step,
        "seconds_per_step": round(seconds / max(trainer.state.global_step, 1), 3),
        "trained_tokens_per_second": round(trainer.state.num_input_tokens_seen / seconds, 1),
        "reference_model_loaded": getattr(trainer, "ref_model", None) is not None,
        "peak_rss_gib": round(peak_kib / 2**20, 3),
        "baseline_rss_gib": round(baseline_kib / 2**20, 3),
        "peak_rss_above_baseline_gib": round((peak_kib - baseline_kib) / 2**20, 3),
        "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        "row_tokens": None if row_tokens is None else {
            "mean": round(statistics.mean(row_tokens)), "p50": round(statistics.median(row_tokens)),
            "p90": sorted(row_tokens)[int(0.9 * len(row_tokens))], "max": max(row_tokens)},
    }


def dpo_trainer(cfg, inputs, out):
    """TRL's DPOTrainer as its users run it: full fine-tuning, which loads a reference copy of the model."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from pipeline.core.models import resolve_model
    from pipeline.steps.redi import preference_dataset
    from pipeline.training.build import drop_overlong, load_tokenizer, training_arguments

    model_path = resolve_model(cfg.model, inputs)
    tokenizer = load_tokenizer(cfg, model_path)
    pairs = drop_overlong(preference_dataset(inputs[cfg.input].dataset(), cfg.input), tokenizer, cfg,
                          ("chosen", "rejected"), cfg.input)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = DPOConfig(**training_arguments(cfg, out), max_length=cfg.max_length)
    return DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)


def run(opts, console) -> tuple[dict, dict]:
    from rich.table import Table

    if opts.lengths:
        return run_length_sweep(opts, console)
    if opts.kd_lengths:
        from pipeline.commands.bench import kd_memory

        return kd_memory.run(opts, console)
    results = {}
    for case in CASES:
        console.print(f"[bold]bench train[/bold]: {case} ({opts.model}, {opts.steps} steps, batch {opts.batch_size})")
        with tempfile.TemporaryDirectory(prefix=f"bench-{case}-") as workdir:
            results[case] = run_child("pipeline.commands.bench.train", {
                "case": case, "model": opts.model, "steps": opts.steps, "rows": opts.rows,
                "batch_size": opts.batch_size, "max_length": opts.max_length,
                "gradient_checkpointing": opts.gradient_checkpointing, "workdir": workdir})

    lengths = results["sft_padded"]["row_tokens"]
    table = Table(title=f"distill bench train — {opts.model}, {opts.steps} steps, batch {opts.batch_size}; SFT rows "
                        f"(tokens) mean {lengths['mean']}, median {lengths['p50']}, p90 {lengths['p90']}, "
                        f"max {lengths['max']}")
    for column in ("case", "ref model", "peak RSS GiB", "above baseline GiB", "CUDA peak GiB", "s/step",
                   "trained tok/s"):
        table.add_column(column, justify="left" if column == "case" else "right", no_wrap=True)
    for r in results.values():
        table.add_row(r["case"], "yes" if r["reference_model_loaded"] else "no", f"{r['peak_rss_gib']:.2f}",
                      f"{r['peak_rss_above_baseline_gib']:.2f}",
                      "-" if r["cuda_peak_gib"] is None else f"{r['cuda_peak_gib']:.2f}",
                      f"{r['seconds_per_step']:.2f}", f"{r['trained_tokens_per_second']:.0f}")
    console.print(table)

    def ratio(key: str, case: str, base: str) -> float | None:
        a, b = results[case][key], results[base][key]
        return None if a is None or not b else round(a / b, 3)

    ratios = {
        "sft_packing_speedup": ratio("trained_tokens_per_second", "sft_packed", "sft_padded"),
        "sft_padding_free_speedup": ratio("trained_tokens_per_second", "sft_padding_free", "sft_padded"),
        "redi_mem_ratio_rss_raw": ratio("peak_rss_gib", "redi", "dpo_with_reference"),
        "redi_mem_ratio_rss_above_baseline": ratio("peak_rss_above_baseline_gib", "redi", "dpo_with_reference"),
        "redi_mem_ratio_cuda": ratio("cuda_peak_gib", "redi", "dpo_with_reference"),
    }
    console.print("REDI / DPO+ref peak memory: raw RSS {redi_mem_ratio_rss_raw}, RSS above baseline "
                  "{redi_mem_ratio_rss_above_baseline}, CUDA {redi_mem_ratio_cuda}".format(**ratios))
    # The headline memory ratio is training memory only: CUDA allocations on a GPU, else RSS above the baseline.
    memory = ratios["redi_mem_ratio_cuda"] or ratios["redi_mem_ratio_rss_above_baseline"]
    raw = {"steps": opts.steps, "rows": opts.rows, "batch_size": opts.batch_size, "max_length": opts.max_length,
           "gradient_checkpointing": opts.gradient_checkpointing,
           "lengths": {"distribution": "log-normal", "median_tokens": MEDIAN_TOKENS, "sigma": SIGMA},
           "cases": list(results.values()), **ratios}
    return raw, {"sft_packing_speedup": ratios["sft_packing_speedup"], "redi_mem_ratio": memory}


def run_length_sweep(opts, console) -> tuple[dict, dict]:
    """REDI vs DPO+ref on pairs of each length in opts.lengths, batch 1: peak memory, ratio, and the longest pair
    each could train within MEMORY_BUDGET_GIB."""
    from rich.table import Table

    checkpointing = ", gradient checkpointing" if opts.gradient_checkpointing else ""
    # Training memory as in the default cases: CUDA allocations on a GPU, else RSS above the process baseline.
    results, memory_key, ratios = memory_sweep(
        "pipeline.commands.bench.train", SWEEP_CASES, opts.lengths, console,
        lambda length: f"pairs of {length} tokens ({opts.model}, {opts.steps} steps, batch 1{checkpointing})",
        lambda case, length: {"case": case, "model": opts.model, "steps": opts.steps, "rows": opts.steps,
                              "batch_size": 1, "max_length": length, "fixed_length": True,
                              "gradient_checkpointing": opts.gradient_checkpointing})
    # The whole process must fit in the budget: raw peak RSS (or the CUDA peak on a GPU).
    budget_key = "cuda_peak_gib" if memory_key == "cuda_peak_gib" else "peak_rss_gib"
    longest = {case: longest_within(MEMORY_BUDGET_GIB, [(length, results[case][length][budget_key])
                                                        for length in opts.lengths]) for case in SWEEP_CASES}

    table = Table(title=f"distill bench train --lengths — {opts.model}, {opts.steps} steps, batch 1 pair, full "
                        f"fine-tuning{checkpointing}")
    for column in ("pair tokens", "seq tokens (mean)", "REDI peak RSS", "REDI above base", "DPO+ref peak RSS",
                   "DPO+ref above base", "REDI / DPO+ref", "REDI s/step", "DPO+ref s/step"):
        table.add_column(column, justify="right", no_wrap=True)
    for length in opts.lengths:
        redi_case, dpo_case = results["redi"][length], results["dpo_with_reference"][length]
        table.add_row(str(length), str(redi_case["row_tokens"]["mean"]), f"{redi_case['peak_rss_gib']:.2f}",
                      f"{redi_case['peak_rss_above_baseline_gib']:.2f}", f"{dpo_case['peak_rss_gib']:.2f}",
                      f"{dpo_case['peak_rss_above_baseline_gib']:.2f}", f"{ratios[length]:.3f}",
                      f"{redi_case['seconds_per_step']:.1f}", f"{dpo_case['seconds_per_step']:.1f}")
    console.print(table)
    for case, (tokens, how) in longest.items():
        console.print(f"{case}: longest pair within {MEMORY_BUDGET_GIB} GiB ({budget_key}): "
                      f"{'-' if tokens is None else f'~{tokens} tokens per sequence'} ({how or 'cannot tell'})")

    in_target_range = ([ratio for length, ratio in ratios.items() if length >= SWEEP_TARGET_FROM]
                       or list(ratios.values()))
    raw = {"steps": opts.steps, "batch_size": 1, "lengths": opts.lengths, "memory": memory_key,
           "gradient_checkpointing": opts.gradient_checkpointing, "memory_budget_gib": MEMORY_BUDGET_GIB,
           "redi_mem_ratio_by_length": ratios,
           "longest_pair_within_budget": {case: {"tokens": tokens, "how": how}
                                          for case, (tokens, how) in longest.items()},
           "cases": [result for by_length in results.values() for result in by_length.values()]}
    # The headline: the worst ratio at SWEEP_TARGET_FROM tokens and more (over every length if none is that long).
    return raw, {"sft_packing_speedup": None, "redi_mem_ratio": max(in_target_range)}


def longest_within(budget: float, points: list[tuple[int, float]]) -> tuple[int | None, str | None]:
    """The longest length whose peak memory fits `budget`, from (length, peak) points measured at increasing lengths:
    interpolated between the two measured lengths around the crossing, else extrapolated along the line through the
    two longest; (None, None) when that cannot be told (one point, or memory not growing)."""
    over = next((i for i, (_, peak) in enumerate(points) if peak > budget), None)
    if over == 0:
        return None, f"over budget already at {points[0][0]}"
    pair, how = ((points[over - 1], points[over]), "interpolated") if over else (points[-2:], "extrapolated linearly")
    if len(pair) < 2 or pair[1][1] <= pair[0][1]:
        return None, None
    (short, short_peak), (long, long_peak) = pair
    return round(short + (budget - short_peak) * (long - short) / (long_peak - short_peak)), how


if __name__ == "__main__":
    child_main({case: run_case for case in CASES})
