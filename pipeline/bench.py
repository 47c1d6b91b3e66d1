"""`distill bench train`: what the training steps cost, measured side by side on this machine.

- REDI against TRL's DPO with a reference model, full fine-tuning on the same pairs: peak memory (process RSS, and
  CUDA peak allocation on a GPU) and seconds per step. REDI loads no reference model, so it should need about one
  model copy less.
- SFT on length-skewed conversations (most short, a few long): trained tokens per second with padded batches,
  packing, and padding-free batches.

Each case runs in its own process so one case's peak memory never shows in another's. Numbers are printed as a
table and written as JSON (`--out`).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("redi", "dpo_with_reference", "sft_padded", "sft_packed", "sft_padding_free")


def skewed_rows(count: int, seed: int = 0) -> list[dict]:
    """Arithmetic pairs whose completions are mostly short, one in eight about 6 times longer."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        steps = "Let me add the tens and then the ones, carefully. " * (16 if i % 8 == 0 else rng.randint(0, 2))
        rows.append({
            "id": f"b{i}",
            "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
            "chosen": [{"role": "assistant", "content": f"{steps}{a} + {b} = {a + b}. \\boxed{{{a + b}}}"}],
            "rejected": [{"role": "assistant", "content": f"{steps}{a} + {b} = {a + b + 1}. \\boxed{{{a + b + 1}}}"}],
        })
    return rows


def run_case(case: str, model: str, steps: int, rows: int, batch_size: int, workdir: Path) -> dict:
    """Train one case for `steps` optimizer steps in this process; its time, throughput and peak memory."""
    import resource

    import torch
    from datasets import Dataset

    from pipeline.artifacts import Artifact, Output
    from pipeline.steps import redi, sft

    data = skewed_rows(rows)
    Dataset.from_list(data).save_to_disk(str(workdir / "pairs" / "data"))
    Dataset.from_list([{"id": r["id"], "messages": r["prompt"] + r["chosen"]} for r in data]).save_to_disk(
        str(workdir / "sft_data" / "data"))
    inputs = {"pairs": Artifact("pairs", "dataset", workdir / "pairs"),
              "sft_data": Artifact("sft_data", "dataset", workdir / "sft_data")}
    out = Output(name=case, kind="model", dir=workdir / case, scratch=workdir / "scratch", seed=0)
    common = dict(model=model, max_steps=steps, batch_size=batch_size, logging_steps=1, save_steps=10_000,
                  max_length=1024)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    if case in ("redi", "dpo_with_reference"):
        cfg = redi.Config(uses="redi", input="pairs", lora=None, learning_rate=1e-6, **common)
        if case == "redi":
            trainer = redi.build_trainer(cfg, inputs, out)[0]
        else:
            trainer = dpo_trainer(cfg, inputs, out)
    else:
        cfg = sft.Config(uses="sft", input="sft_data", lora=None, learning_rate=1e-5, packing=case == "sft_packed",
                         padding_free=case == "sft_padding_free", **common)
        trainer = sft.build_trainer(cfg, inputs, out)[0]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    return {
        "case": case,
        "model": model,
        "steps": trainer.state.global_step,
        "seconds_per_step": round(seconds / max(trainer.state.global_step, 1), 3),
        "trained_tokens_per_second": round(trainer.state.num_input_tokens_seen / seconds, 1),
        "reference_model_loaded": getattr(trainer, "ref_model", None) is not None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "rss_before_model_gib": round(rss_before_kib / 2**20, 3),
        "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
    }


def dpo_trainer(cfg, inputs, out):
    """TRL's DPOTrainer as its users run it: full fine-tuning, which loads a reference copy of the model."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from pipeline.models import resolve_model
    from pipeline.steps.redi import preference_dataset
    from pipeline.steps.sft import drop_overlong, load_tokenizer, training_arguments

    model_path = resolve_model(cfg.model, inputs)
    tokenizer = load_tokenizer(cfg, model_path)
    pairs = drop_overlong(preference_dataset(inputs[cfg.input].dataset(), cfg.input), tokenizer, cfg,
                          ("chosen", "rejected"), cfg.input)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = DPOConfig(**training_arguments(cfg, out), max_length=cfg.max_length)
    return DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)


def bench_train(model: str, steps: int, rows: int, batch_size: int, out_file: str | None, console) -> list[dict]:
    from rich.table import Table

    results = []
    for case in CASES:
        console.print(f"[bold]bench train[/bold]: {case} ({model}, {steps} steps, batch {batch_size})")
        with tempfile.TemporaryDirectory(prefix=f"bench-{case}-") as workdir:
            spec = json.dumps({"case": case, "model": model, "steps": steps, "rows": rows, "batch_size": batch_size,
                               "workdir": workdir})
            process = subprocess.run([sys.executable, "-m", "pipeline.bench", spec], stdout=subprocess.PIPE, text=True)
        if process.returncode != 0:
            raise RuntimeError(f"bench case {case} failed (exit code {process.returncode}); its log is above")
        results.append(json.loads(process.stdout.strip().splitlines()[-1]))

    table = Table(title=f"distill bench train — {model}, {steps} steps, batch {batch_size}")
    for column in ("case", "ref model", "peak RSS GiB", "CUDA peak GiB", "s/step", "trained tok/s"):
        table.add_column(column, justify="left" if column == "case" else "right", no_wrap=True)
    for r in results:
        table.add_row(r["case"], "yes" if r["reference_model_loaded"] else "no", f"{r['peak_rss_gib']:.2f}",
                      "-" if r["cuda_peak_gib"] is None else f"{r['cuda_peak_gib']:.2f}", f"{r['seconds_per_step']:.2f}",
                      f"{r['trained_tokens_per_second']:.0f}")
    console.print(table)
    if out_file:
        Path(out_file).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    # One case, in a fresh process; the result is the last line of stdout (logs go to stderr).
    spec = json.loads(sys.argv[1])
    stdout, sys.stdout = sys.stdout, sys.stderr
    result = run_case(spec["case"], spec["model"], spec["steps"], spec["rows"], spec["batch_size"], Path(spec["workdir"]))
    stdout.write(json.dumps(result) + "\n")
