"""`distill bench`: what each part of the pipeline costs, measured side by side in one run on this machine.

    sample   our sample step vs a bare vLLM script vs HF `generate`, completion tokens/s on the same prompts;
             and how close that gets to the decode bound (see `decode`)
    verify   the grading pool with 1 and 2 workers, graded samples/s on MATH-500/GSM8K completions, clean and with
             5% pathological ones; and on 10k-100k-character teacher-like traces, ours vs plain math-verify
    train    SFT tokens/s packed and padding-free vs padded, on log-normal lengths; REDI vs TRL's DPO with a
             reference model, peak memory; with --lengths, REDI vs DPO+ref on long pairs, length by length; with
             --kd-lengths, kd (top-K) vs full-logit KD, peak memory, length by length
    cache    a finished recipe re-run in a fresh process, wall seconds
    decode   matmul GFLOP/s and copy GB/s on this machine: the bounds on decode tokens/s (`sample` includes it)
    data     load, verify's bookkeeping, select, pairs and filter at 10k-1M synthetic rows: seconds and peak memory
    ray      the driver's own time on the `engine: ray` path (hand-off, shard writes, Ray start and stop) and the
             verify step's, on 2k and 10k prompts with a tiny model, apart from the engines'; not part of `all`
             (it needs the ray extra and starts a local Ray cluster)

Each benchmark prints a table; `--json PATH` writes the headline numbers under fixed keys (null for a benchmark
that was not run), the targets, and every raw number under the benchmark's own key.

`distill bench all` at the default sizes takes about 12 minutes on a quiet 2-core CPU: sample ~2 min (HF generate
is most of it), verify ~1.5 min, train ~6 min (five cases, each a fresh process that loads the model, 2 steps of
~15-50 s), cache ~3 min (recipes/smoke.yaml runs once in full).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS = ("sample", "verify", "train", "cache", "decode", "data", "ray")
# run only when named: `all` leaves them out
NOT_IN_ALL = ("ray",)
# headline key -> (benchmark that measures it, target, whether higher is better); decode_fraction_of_bound has no
# target: it says how much of the machine's compute the sampler turns into tokens.
HEADLINES = {
    "sample_vs_vllm": ("sample", 0.95, True),
    "sample_vs_hf": ("sample", 5.0, True),
    "verify_speedup": ("verify", 1.8, True),
    "verify_pathological_slowdown": ("verify", 2.0, False),
    "verify_long_trace_speedup": ("verify", 1.5, True),
    "sft_packing_speedup": ("train", 1.5, True),
    "redi_mem_ratio": ("train", 0.6, False),
    "cached_rerun_s": ("cache", 3.0, False),
    "decode_fraction_of_bound": ("sample", None, True),
}


def run_benchmarks(targets: list[str], opts, console) -> dict:
    """Run the named benchmarks (or `all`) in a fixed order; the JSON-ready results."""
    from importlib import import_module

    from rich.table import Table

    from pipeline.core.env import device
    from pipeline.core.outputs import write_file
    from pipeline.engines.vllm_local import usable_cores

    chosen = [b for b in BENCHMARKS if b in targets or ("all" in targets and b not in NOT_IN_ALL)]
    if "sample" in chosen and "decode" in chosen:
        chosen.remove("decode")  # sample measures it
    results: dict = {key: None for key in HEADLINES}
    for name in chosen:
        raw, headlines = import_module(f"pipeline.commands.bench.{name}").run(opts, console)
        results[name] = raw
        results.update(headlines)
    results["targets"] = {key: target for key, (_, target, _) in HEADLINES.items() if target is not None}
    results["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["machine"] = {"device": device(), "cpus": usable_cores(), "platform": platform.platform(),
                          "load_average": os.getloadavg()}

    results["met"] = {key: (results[key] >= target if higher else results[key] <= target)
                      for key, (_, target, higher) in HEADLINES.items()
                      if target is not None and results[key] is not None}

    table = Table(title="distill bench — targets")
    for column in ("headline", "target", "measured", "met?"):
        table.add_column(column, justify="left" if column == "headline" else "right")
    for key, (name, target, higher) in HEADLINES.items():
        if name in chosen:
            value, met = results[key], results["met"].get(key)
            table.add_row(key, "-" if target is None else f"{'≥' if higher else '≤'} {target:g}",
                          "-" if value is None else f"{value:.3g}", "-" if met is None else "yes" if met else "[red]no")
    console.print(table)
    if opts.json:  # `distill bench` claimed it before the benchmarks ran (`pipeline.core.outputs`)
        write_file(Path(opts.json), lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n"))
        console.print(f"results -> {opts.json}")
    return results


def run_child(module: str, spec: dict, env: dict | None = None) -> dict:
    """Run `python -m module SPEC` (a `child_main`) in a fresh process, so its memory, threads and engine are its
    own; its result is the last line of its stdout (its logs go to stderr and show)."""
    process = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                             env=env)
    if process.returncode != 0:
        raise RuntimeError(f"{module} {spec.get('case', '')} failed (exit code {process.returncode}); its log is above")
    return json.loads(process.stdout.strip().splitlines()[-1])


def train_measured(trainer) -> tuple[float, int]:
    """`trainer.train()` from a reset CUDA peak: (its seconds, this process's peak RSS in KiB once it is done)."""
    import resource
    import time

    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    trainer.train()
    return time.time() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_sweep(module: str, cases: tuple[str, str], lengths: list[int], console, describe, spec) -> tuple:
    """Each of the two `cases` at each of `lengths`, each in its own process (`run_child` on `module`, with the dict
    `spec(case, length)` and a temporary workdir). Returns (results[case][length], the memory measure: the CUDA peak
    on a GPU, else RSS above the process baseline, and {length: first case's memory / second case's})."""
    import tempfile

    results = {case: {} for case in cases}
    for length in lengths:
        for case in cases:
            console.print(f"[bold]bench train[/bold]: {case}, {describe(length)}")
            with tempfile.TemporaryDirectory(prefix=f"bench-{case}-{length}-") as workdir:
                results[case][length] = run_child(module, {**spec(case, length), "workdir": workdir})
    ours, theirs = cases
    memory_key = ("cuda_peak_gib" if results[ours][lengths[0]]["cuda_peak_gib"] is not None
                  else "peak_rss_above_baseline_gib")
    ratios = {length: round(results[ours][length][memory_key] / results[theirs][length][memory_key], 3)
              for length in lengths}
    return results, memory_key, ratios


def child_main(cases: dict) -> None:
    """The child side of `run_child`: run cases[spec["case"]](spec) and print its result as the last stdout line."""
    spec = json.loads(sys.argv[1])
    stdout, sys.stdout = sys.stdout, sys.stderr
    result = cases[spec["case"]](spec)
    stdout.write(json.dumps(result) + "\n")
    stdout.flush()


def token_lengths(text: str) -> list[int]:
    """`--lengths 512,1024`: increasing token counts, each at least 128 (room for the prompt and template)."""
    import argparse

    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated token counts: {text!r}") from None
    if sorted(set(lengths)) != lengths or lengths[0] < 128:
        raise argparse.ArgumentTypeError(f"lengths must increase and be at least 128: {text!r}")
    return lengths


def dtype_list(text: str) -> list[str]:
    """`--dtypes bfloat16,float32`: model dtypes, each once."""
    import argparse

    dtypes = [part.strip() for part in text.split(",") if part.strip()]
    if not dtypes or len(set(dtypes)) < len(dtypes) or not set(dtypes) <= {"bfloat16", "float16", "float32"}:
        raise argparse.ArgumentTypeError(f"not distinct dtypes of bfloat16, float16, float32: {text!r}")
    return dtypes


def add_arguments(parser) -> None:
    parser.add_argument("targets", nargs="+", choices=[*BENCHMARKS, "all"], metavar="{sample,verify,train,cache,"
                        "decode,data,ray,all}", help="benchmarks to run (all: every one but ray)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to this file")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="model to sample and train")
    sample = parser.add_argument_group("sample")
    sample.add_argument("--prompts", type=int, default=8, help="arith_train problems to sample")
    sample.add_argument("--n", type=int, default=4, help="completions per prompt")
    sample.add_argument("--max-tokens", type=int, default=128, help="new tokens per completion at most")
    sample.add_argument("--hf-batch-size", type=int, default=64, help="prompts per HF generate call")
    sample.add_argument("--dtypes", type=dtype_list, default=["bfloat16", "float32"], metavar="DTYPE,...",
                        help="dtypes to run every case in (bfloat16,float32 by default; the headlines use the one "
                        "`dtype: auto` picks here)")
    verify = parser.add_argument_group("verify")
    verify.add_argument("--samples", type=int, default=4000, help="MATH-500/GSM8K samples to grade (4 per problem)")
    verify.add_argument("--rounds", type=int, default=7, help="1- and 2-worker runs back to back; medians reported")
    train = parser.add_argument_group("train")
    train.add_argument("--steps", type=int, default=2, help="optimizer steps per training case")
    train.add_argument("--rows", type=int, default=64, help="log-normal-length rows (pairs / conversations)")
    train.add_argument("--batch-size", type=int, default=4, help="rows per training step")
    train.add_argument("--max-length", type=int, default=1024, help="longest training row in tokens")
    train.add_argument("--lengths", type=token_lengths, metavar="N,N,...",
                       help="instead of the default cases: REDI vs DPO+ref peak memory on pairs of each of these "
                       "lengths in tokens (chosen and rejected each), batch 1, e.g. 512,1024,2048,4096")
    train.add_argument("--kd-lengths", type=token_lengths, metavar="N,N,...",
                       help="instead of the default cases: a kd step (top-K, K=20) vs a full-logit KD step, peak "
                       "memory on rows of each of these lengths in tokens, batch 1, e.g. 512,1024,2048")
    train.add_argument("--gradient-checkpointing", action="store_true", help="train every case with it")
    cache = parser.add_argument_group("cache")
    cache.add_argument("--recipe", default="recipes/smoke.yaml", help="recipe to run, then re-run from cache")
    decode = parser.add_argument_group("decode")
    decode.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul for peak GFLOP/s")
    from pipeline.commands.bench.data import CASES, case_names, row_counts
    from pipeline.commands.bench.ray import prompt_counts

    data = parser.add_argument_group("data")
    data.add_argument("--data-rows", type=row_counts, default=[10_000, 100_000], metavar="N,N,...",
                      help="sample rows per size (4 per problem), e.g. 10000,100000,1000000")
    data.add_argument("--data-cases", type=case_names, default=list(CASES), metavar="CASE,...",
                      help=f"steps to time, of {','.join(CASES)} (load and verify always run: they make the "
                      "others' inputs)")
    ray = parser.add_argument_group("ray")
    ray.add_argument("--ray-prompts", type=prompt_counts, default=[2_000, 10_000], metavar="N,N,...",
                     help="problems to sample (n 1) and verify, one run per size; two or more sizes also give the "
                     "seconds per 10,000 more prompts and the fixed part")
    ray.add_argument("--ray-replicas", type=int, default=2, help="engine replicas on the local Ray cluster")
    ray.add_argument("--ray-max-tokens", type=int, default=8, help="new tokens per completion at most")
    ray.add_argument("--ray-chunk-size", type=int, default=64, help="problems per chunk (the sample step's default)")
    ray.add_argument("--ray-model", default="builtin:tiny-random", help="model the replicas run")
    ray.add_argument("--ray-trace-chars", type=int, default=21_000,
                     help="characters per completion in the long-completion case (~6,000 tokens)")
