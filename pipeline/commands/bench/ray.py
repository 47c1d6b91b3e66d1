"""`distill bench ray`: the driver's own cost on the `engine: ray` path, with the engine made nearly free.

`--ray-prompts` synthetic arithmetic problems (unique ids) go through the `sample` step with `engine: ray` (n 1,
`--ray-max-tokens` new tokens, `--ray-replicas` replicas on the local Ray cluster the step starts, chunks of
`--ray-chunk-size`) on `--ray-model` (builtin:tiny-random: a 2-layer model, so generating costs little), then through
the `verify` step (its grading pool, default workers and timeout) on those samples. All of it runs in one fresh
process (`run_child`), Ray's files in a temp dir of their own.

What it separates, in seconds, per size (one run each, `--ray-prompts 2000,10000`):
    wall            the sample step's `run`, start to end (Ray start to dataset written)
    engine          what the engines cost, from the replicas' own clocks: start-up (the slowest replica's engine
                    load, vLLM's import not included) + the span from the first chunk's start to the last one's end
                    (replicas side by side); `engine_generate` = the replicas' generate calls summed,
                    `replica_idle` = replicas x span - that (a replica waiting between chunks: Ray Data's dispatch,
                    results in flight)
    driver          wall - engine: everything that is not an engine starting or generating, of which
    driver phases   the driver's own work, from the manifest's `ray.driver_seconds` (pipeline.engines.ray_replicas's
                    DRIVER_PHASES): Ray start, the hand-off of the prompts (the Dataset), decoding results,
                    `on_chunk` (shard writes), stats and Ray stop; and the step outside `generate` (imports, tokenizer,
                    prompts, building and writing the dataset); `ray_other` = the driver blocked on Ray outside the
                    engines' clocks (Ray Data starting the replica actors, their engine processes importing vLLM)
    verify          the verify step's `run` on the samples (grading server start included)
With two sizes or more, each number through the smallest and largest: seconds per 10,000 more prompts (what grows
with the data) and the fixed part (what a run pays once).

And, without Ray or an engine, what the driver's per-chunk handling costs per byte of completion text, which the
short completions above cannot show: a chunk of `--ray-chunk-size` x 4 completions of `LONG_TRACE_CHARS` characters
(the long traces' mean in `bench verify`) as a replica returns it (JSON), decoded and written as a shard the way
`ray_replicas.generate` and the sample step's `on_chunk` do; MB/s, median of 3. And the sample step itself on long
completions, its engine replaced by a stand-in that hands out `--ray-trace-chars`-character completions through
`on_chunk` (`long_samples`, 2,000 and 6,000 problems): seconds and peak RSS per GB of completion text, what the
driver pays after the engines are done (building and writing the dataset); and the peak of RSS's anonymous part
(RssAnon, polled), which leaves out the pages of the memory-mapped Arrow files the step writes and reads back
(clean page cache the kernel reclaims under pressure).

`decode_model` is a model, not a measurement (used in BENCHMARKS.md "Scale on paper"): one GPU's decode tokens/s
on long traces, as one stream or in the engine's chunks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.commands.bench import child_main, run_child

SEED = 0
TEMPERATURE = 0.7
PER = 10_000  # prompts that the scaled numbers are per
LONG_TRACE_CHARS = 37_000  # the mean of bench verify's long traces
LONG_CHUNK_SAMPLES_PER_PROBLEM = 4  # the REDI recipe's n
LONG_SAMPLES = (2000, 6000)  # problems (n 1) of the sample step on long completions, two sizes for the per-GB slope
DRIVER_OWN_PHASES = ("ray_start", "dataset", "results", "on_chunk", "finish")


def prompt_counts(text: str) -> list[int]:
    """`--ray-prompts 2000,10000`: increasing prompt counts, each at least 1."""
    import argparse

    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated prompt counts: {text!r}") from None
    if sorted(set(counts)) != counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"prompt counts must increase and be at least 1: {text!r}")
    return counts


def problems(count: int) -> dict[str, list]:
    """`count` arithmetic problems with unique ids, deterministic."""
    rng = random.Random(SEED)
    pairs = [(rng.randint(2, 999), rng.randint(2, 999)) for _ in range(count)]
    return {"id": [f"bench-ray-{i:06d}" for i in range(count)],
            "problem": [f"What is {a} + {b}?" for a, b in pairs],
            "answer": [str(a + b) for a, b in pairs]}


def summarize(replicas: int, wall_s: float, sample_stats: dict, verify_s: float) -> dict:
    """Engine vs driver seconds from the sample step's wall time and manifest stats (see the module docstring)."""
    ray = sample_stats["ray"]
    load = max((r["load_seconds"] for r in ray["per_replica"].values()), default=0.0)
    generate = sum(r["generate_seconds"] for r in ray["per_replica"].values())
    span = ray["span_seconds"]
    engine = load + span
    phases = ray["driver_seconds"]
    outside_generate = max(wall_s - sample_stats["seconds"], 0.0)
    driver_own = sum(phases[p] for p in DRIVER_OWN_PHASES) + outside_generate
    seconds = {
        "wall": wall_s, "engine": engine, "engine_load": load, "engine_span": span, "engine_generate": generate,
        "replica_idle": max(replicas * span - generate, 0.0), "driver": wall_s - engine,
        **{f"driver_{phase}": phases[phase] for phase in DRIVER_OWN_PHASES},
        "step_outside_generate": outside_generate, "driver_own": driver_own,
        # blocked on Ray but not in an engine's clock: Ray Data starting the actors, the engine processes starting
        # and importing vLLM, results in flight
        "ray_other": max(phases["waiting"] - engine, 0.0), "verify": verify_s}
    return {"seconds": {key: round(value, 3) for key, value in seconds.items()},
            "driver_fraction_of_wall": round((wall_s - engine) / wall_s, 3) if wall_s > 0 else None,
            "verify_samples_per_s": round(sample_stats["rows"] / verify_s, 1) if verify_s > 0 else None,
            "chunks": sample_stats["chunks"], "completion_tokens": sample_stats["completion_tokens"]}


def long_chunk(spec: dict) -> dict:
    """The driver's handling of one chunk of long completions: decode the replica's JSON, build the completions,
    write the shard (as ray_replicas.generate and the sample step's on_chunk do). Seconds and MB/s, median of 3."""
    from pipeline.core.artifacts import write_json_atomic
    from pipeline.engines.request import Completion

    rng = random.Random(SEED)
    words = ("Let", "me", "check", "the", "sum", "again:", "so", "x", "=", "\\frac{3}{4}", "and", "then", "we", "get",
             "Wait,", "that", "is", "not", "right.", "$2^{10}", "+", "1$", "\n\n", "Therefore")
    problems_in_chunk, n = spec["chunk_size"], LONG_CHUNK_SAMPLES_PER_PROBLEM

    def trace() -> str:
        text = " ".join(rng.choice(words) for _ in range(LONG_TRACE_CHARS // 4))
        return text[:LONG_TRACE_CHARS] + "</think>\nThe answer is \\boxed{42}."

    completions = [[{"text": trace(), "finish_reason": "stop", "prompt_tokens": 60, "completion_tokens": 9000}
                    for _ in range(n)] for _ in range(problems_in_chunk)]
    payload = json.dumps({"completions": completions, "seconds": 1.0, "finished_at": time.time(),
                          "load_seconds": 1.0, "replica": "bench", "node": "bench"})
    text_bytes = sum(len(c["text"].encode()) for per_problem in completions for c in per_problem)
    times = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-shard-") as shard_dir:
        for attempt in range(3):
            started = time.perf_counter()
            result = json.loads(payload)
            chunk_completions = [[Completion(**c) for c in per_problem] for per_problem in result["completions"]]
            write_json_atomic(Path(shard_dir) / f"chunk-{attempt:06d}.json", {
                "chunk": attempt, "ids": [str(i) for i in range(problems_in_chunk)], "generate_seconds": 1.0,
                "completions": [[vars(c) for c in per_problem] for per_problem in chunk_completions]})
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {"samples": problems_in_chunk * n, "chars_per_sample": LONG_TRACE_CHARS,
            "text_mb": round(text_bytes / 1e6, 2), "seconds": round(seconds, 3),
            "mb_per_s": round(text_bytes / 1e6 / seconds, 1)}


def long_samples(spec: dict) -> dict:
    """The sample step (local path) on spec["prompts"] problems with the engine replaced by a stand-in that hands
    out canned completions of spec["chars"] characters chunk by chunk through `on_chunk`, as the engines do: the
    step's own work on long completions (shard writes, the dataset's columns, writing it). Wall seconds, the
    text's GB, and the process's peak RSS."""
    import resource

    import datasets

    from pipeline.core.artifacts import Artifact, Output
    from pipeline.core.models import resolve_model
    from pipeline.engines import vllm_local
    from pipeline.engines.request import Completion, Generations
    from pipeline.steps import sample

    datasets.disable_progress_bars()
    count, chars, workdir = spec["prompts"], spec["chars"], Path(spec["workdir"])
    rng = random.Random(SEED)
    words = ("Let", "me", "check", "the", "sum", "again:", "so", "x", "=", "\\frac{3}{4}", "and", "Wait,", "$2^{10}$")
    filler = " ".join(rng.choice(words) for _ in range(chars // 4))

    def stand_in(request, *, on_chunk, **_):
        completions = []
        for chunk, rows in enumerate(request.chunks):
            made = [[Completion(f"{filler[:chars - 40]} {p:06d}</think>\nThe answer is \\boxed{{{p}}}.", "stop", 60,
                                chars // 4) for _ in range(request.n)] for p in rows]
            completions += made
            on_chunk(chunk, made, 1.0)
        return Generations(completions)

    vllm_local.generate = stand_in  # this child process only
    datasets.Dataset.from_dict(problems(count)).save_to_disk(str(workdir / "problems" / "data"))
    cfg = sample.Config(uses="sample", input="problems", model=str(resolve_model(spec["model"], {})), n=1,
                        max_tokens=chars // 4)
    out = Output(name="samples", kind="dataset", dir=workdir / "samples", scratch=workdir / "samples_scratch",
                 seed=SEED)
    anon = _PeakAnon()
    started = time.perf_counter()
    with anon:
        sample.run(cfg, {"problems": Artifact("problems", "dataset", workdir / "problems")}, out)
    return {"prompts": count, "chars": chars, "text_gb": round(count * chars / 1e9, 4),
            "seconds": round(time.perf_counter() - started, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            **({"peak_anon_gib": round(anon.peak_kib / 2**20, 3)} if anon.peak_kib else {})}


class _PeakAnon:
    """The peak of this process's RssAnon (Linux /proc/self/status), polled every 5 ms in a thread while in the
    `with` block; 0 where there is no /proc."""

    def __init__(self):
        self.peak_kib, self._stop = 0, None

    def _read(self) -> int:
        try:
            with open("/proc/self/status") as status:
                return next((int(line.split()[1]) for line in status if line.startswith("RssAnon:")), 0)
        except OSError:
            return 0

    def __enter__(self):
        import threading

        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(0.005):
                self.peak_kib = max(self.peak_kib, self._read())

        self._thread = threading.Thread(target=poll, daemon=True)
        self.peak_kib = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self._read())


def per_gb(small: dict, large: dict) -> dict:
    """Through two `long_samples` runs: the step's seconds and peak RSS per GB of completion text."""
    gb = large["text_gb"] - small["text_gb"]
    anon = "peak_anon_gib" in small and "peak_anon_gib" in large
    return {"seconds_per_gb": round((large["seconds"] - small["seconds"]) / gb, 1),
            "rss_gib_per_gb": round((large["peak_rss_gib"] - small["peak_rss_gib"]) / gb, 2),
            **({"anon_gib_per_gb": round((large["peak_anon_gib"] - small["peak_anon_gib"]) / gb, 2)} if anon else {})}


def decode_model(lengths: list[int], chunk: int | None, *, weights_bytes: float = 15.2e9,
                 kv_bytes_per_token: int = 57_344, kv_bytes: float = 52e9, bandwidth: float = 0.7 * 3.35e12,
                 prompt: int = 200, max_seqs: int = 256) -> dict:
    """A model, not a measurement: output tokens/s of one GPU decoding sequences of these `lengths`, each step
    bandwidth-bound (it reads the weights and the KV cache of every running sequence), sequences admitted first
    come first served while the KV cache has room (no preemption), either as one stream (`chunk` None) or in
    chunks of `chunk` sequences one after another, each from empty, as the Ray engine's replicas generate them.
    Defaults: DeepSeek-R1-Distill-Qwen-7B in bf16 on an 80 GB H100 (28 layers x 4 KV heads x 128 x K and V x 2
    bytes per token; 0.9 of the memory less weights and ~5 GB of activations for the KV cache; 70% of 3.35 TB/s)."""
    import numpy as np

    def seconds(queue: list[int]) -> float:
        pending, context, left, total = list(reversed(queue)), np.zeros(0), np.zeros(0, dtype=int), 0.0
        while pending or len(left):
            while (pending and len(left) < max_seqs
                   and (context.sum() + prompt) * kv_bytes_per_token < kv_bytes):
                context, left = np.append(context, prompt), np.append(left, pending.pop())
            total += (weights_bytes + context.sum() * kv_bytes_per_token) / bandwidth
            context, left = context + 1, left - 1
            context, left = context[left > 0], left[left > 0]
        return total

    size = chunk or len(lengths)
    total = float(sum(seconds(lengths[start:start + size]) for start in range(0, len(lengths), size)))
    return {"sequences": len(lengths), "tokens": int(sum(lengths)), "seconds": round(total, 1),
            "tokens_per_s": round(sum(lengths) / total, 1)}


def measure(spec: dict) -> dict:
    """The child: sample (engine ray) and verify on spec["prompts"] problems; the raw stats and the summary."""
    import datasets

    from pipeline.core.artifacts import Artifact, Output
    from pipeline.core.models import resolve_model
    from pipeline.steps import sample, verify

    datasets.disable_progress_bars()
    workdir = Path(spec["workdir"])
    datasets.Dataset.from_dict(problems(spec["prompts"])).save_to_disk(str(workdir / "problems" / "data"))
    model_dir = str(resolve_model(spec["model"], {}))
    cfg = sample.Config(uses="sample", input="problems", model=model_dir, n=1, temperature=TEMPERATURE,
                        max_tokens=spec["max_tokens"], chunk_size=spec["chunk_size"], engine="ray",
                        replicas=spec["replicas"])
    out = Output(name="samples", kind="dataset", dir=workdir / "samples", scratch=workdir / "samples_scratch",
                 seed=SEED)
    started = time.perf_counter()
    sampled = sample.run(cfg, {"problems": Artifact("problems", "dataset", workdir / "problems")}, out)
    wall = time.perf_counter() - started

    graded_out = Output(name="graded", kind="dataset", dir=workdir / "graded", scratch=workdir / "graded_scratch",
                        seed=None)
    started = time.perf_counter()
    graded = verify.run(verify.Config(uses="verify", input="samples"), {"samples": sampled}, graded_out)
    verify_s = time.perf_counter() - started
    labels = {key.removeprefix("label_"): value for key, value in graded.stats.items()
              if key.startswith("label_") and isinstance(value, int)}
    return {"sample_stats": sampled.stats, "wall_s": round(wall, 3), "verify_s": round(verify_s, 3),
            "verify_labels": labels, "load_average_after": os.getloadavg()}


NAMES = {"wall": "sample step, wall", "engine": "engine = load + span", "engine_load": "  load (slowest)",
         "engine_span": "  span", "engine_generate": "  generate, summed", "replica_idle": "  replicas idle in span",
         "driver": "driver = wall - engine", "driver_ray_start": "  Ray start", "driver_dataset": "  hand-off",
         "driver_results": "  decode results", "driver_on_chunk": "  on_chunk (shards)",
         "driver_finish": "  stats + Ray stop", "step_outside_generate": "  step outside generate",
         "driver_own": "  own work (sum)", "ray_other": "  Ray, not engine", "verify": "verify step, wall"}


def fit(sizes: list[int], seconds: dict[int, dict[str, float]]) -> dict:
    """Through the smallest and largest size: each number's seconds per 10,000 more prompts (what grows with the
    prompts) and its fixed part (what a run pays once: Ray and engine start-up, imports, the grading server)."""
    small, large = min(sizes), max(sizes)
    slopes = {key: (seconds[large][key] - seconds[small][key]) / (large - small) for key in seconds[large]}
    return {"marginal_per_10k_prompts_s": {key: round(slope * PER, 2) for key, slope in slopes.items()},
            "fixed_s": {key: round(seconds[small][key] - slope * small, 2) for key, slope in slopes.items()}}


def run(opts, console) -> tuple[dict, dict]:
    from rich.table import Table

    results: dict = {"replicas": opts.ray_replicas, "max_tokens": opts.ray_max_tokens,
                     "chunk_size": opts.ray_chunk_size, "model": opts.ray_model, "sizes": {}}
    for prompts in opts.ray_prompts:
        load_before = os.getloadavg()
        workdir = Path(tempfile.mkdtemp(prefix="bench-ray-"))
        ray_tmp = tempfile.mkdtemp(prefix="rayb", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
        console.print(f"[bold]bench ray[/bold]: {prompts:,} prompts x 1, ≤ {opts.ray_max_tokens} tokens, "
                      f"{opts.ray_replicas} replica(s) of {opts.ray_model}, chunks of {opts.ray_chunk_size}")
        try:
            measured = run_child("pipeline.commands.bench.ray", {
                "case": "measure", "workdir": str(workdir), "prompts": prompts, "model": opts.ray_model,
                "max_tokens": opts.ray_max_tokens, "chunk_size": opts.ray_chunk_size, "replicas": opts.ray_replicas},
                env={**os.environ, "RAY_TMPDIR": ray_tmp})
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(ray_tmp, ignore_errors=True)
        summary = summarize(opts.ray_replicas, measured["wall_s"], measured["sample_stats"], measured["verify_s"])
        results["sizes"][str(prompts)] = {
            **summary, "verify_labels": measured["verify_labels"], "sample_stats": measured["sample_stats"],
            "load_average": {"before": load_before, "after": measured["load_average_after"]}}
    sizes = opts.ray_prompts
    if len(sizes) > 1:
        results.update(fit(sizes, {n: results["sizes"][str(n)]["seconds"] for n in sizes}))
    results["long_chunk"] = long = run_child("pipeline.commands.bench.ray", {"case": "long_chunk",
                                                                    "chunk_size": opts.ray_chunk_size})
    runs = []
    for count in LONG_SAMPLES:
        workdir = Path(tempfile.mkdtemp(prefix="bench-ray-long-"))
        try:
            runs.append(run_child("pipeline.commands.bench.ray", {"case": "long_samples", "prompts": count,
                                                         "chars": opts.ray_trace_chars, "model": opts.ray_model,
                                                         "workdir": str(workdir)}))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    results["long_samples"] = {"runs": runs, **per_gb(*runs)}

    table = Table(title=f"distill bench ray — {opts.ray_replicas} replica(s) of {opts.ray_model}, n 1, "
                        f"≤ {opts.ray_max_tokens} tokens, chunks of {opts.ray_chunk_size}: seconds")
    table.add_column("part")
    for n in sizes:
        table.add_column(f"{n:,} prompts", justify="right")
    if len(sizes) > 1:
        table.add_column("per 10,000 more", justify="right")
        table.add_column("fixed", justify="right")
    for key, name in NAMES.items():
        row = [f"{results['sizes'][str(n)]['seconds'][key]:.2f}" for n in sizes]
        if len(sizes) > 1:
            row += [f"{results['marginal_per_10k_prompts_s'][key]:.2f}", f"{results['fixed_s'][key]:.2f}"]
        table.add_row(name, *row)
    console.print(table)
    for n in sizes:
        size = results["sizes"][str(n)]
        console.print(f"{n:,} prompts: {size['chunks']} chunks, {size['completion_tokens']:,} completion tokens; "
                      f"verify {size['verify_samples_per_s']} samples/s, labels {size['verify_labels']}; "
                      f"load average {size['load_average']['before'][0]:.2f} before, "
                      f"{size['load_average']['after'][0]:.2f} after")
    console.print(f"driver's handling of a chunk of {long['samples']} x {long['chars_per_sample']:,}-character "
                  f"completions (decode, shard write): {long['seconds']:.2f} s, {long['mb_per_s']} MB/s")
    console.print("the sample step on long completions (engine stand-in): " + ", ".join(
        f"{r['prompts']:,} x {r['chars']:,} characters {r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB"
        + (f" (anonymous {r['peak_anon_gib']:.2f})" if "peak_anon_gib" in r else "")
        for r in runs) + f"; per GB of text {results['long_samples']['seconds_per_gb']} s and "
        f"{results['long_samples']['rss_gib_per_gb']} GiB of RSS"
        + (f" ({results['long_samples']['anon_gib_per_gb']} anonymous)" if "anon_gib_per_gb" in results["long_samples"]
           else ""))
    return results, {}


if __name__ == "__main__":
    child_main({"measure": measure, "long_chunk": long_chunk, "long_samples": long_samples})
