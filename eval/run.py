"""Running an evaluation: sample every model on every benchmark with vLLM (resuming from saved chunks), then grade,
score and write the outputs (eval/results.py). The `evaluate` step and `distill eval` both run `evaluate_models`.

Resume: each model generates on one engine, in chunks of `chunk_size` problems cut per benchmark (no chunk
spans two benchmarks), and each finished chunk is saved in a scratch dir, so a killed run loses at most the
chunk it was generating.

Determinism: sample k of a problem is drawn with its own seed from (seed, problem id, k), and a benchmark's
chunks hold the same problems whatever other benchmarks (and their limits) share the run, each chunk computed
on its own (no prefix cache carried from one chunk to the next). So a benchmark's samples do not depend on the other
benchmarks, on the order of benchmarks or models, or on a kill and resume. They do depend on the model, the
prompt, the sampling settings and the seed; and, through rounding, with bfloat16 weights (vLLM's default on CPU)
on what shares a problem's chunk: another `chunk_size`, n or limit on the same benchmark can change some samples
(see pipeline/engines/vllm_local.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from eval.results import grade_score_and_write
from pipeline.core.artifacts import write_json_atomic
from pipeline.core.errors import UserError
from pipeline.text import chat
from pipeline.text.prompts import render_prompt

SHARD_DIR = "chunks"  # in scratch: one file per finished chunk


class EvaluationSettings(Protocol):
    """What an evaluation reads of its settings: the `evaluate` step's Config (pipeline/steps/evaluate.py), which
    `distill eval` builds from its flags."""

    models: list[str]
    benchmarks: list[str]
    baseline: str | None
    preset: str
    limit: int | None
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    max_model_len: int | None
    prompt_template: str
    think_prefix: str | None
    chunk_size: int
    workers: int
    timeout_s: float
    tensor_parallel_size: int
    data_parallel_size: int
    distributed_executor_backend: str | None
    engine: str

    @property
    def template_text(self) -> str: ...

    def samples_per_problem(self, benchmark) -> int: ...

    def dtype_choice(self): ...

    def request_settings(self) -> dict: ...

    def ray_settings(self) -> dict: ...


def evaluate_models(cfg: EvaluationSettings, models: dict[str, str], out_dir: Path, scratch: Path, seed: int) -> dict:
    """Generate, grade and score every model (label -> resolved dir or hub id) on every benchmark of `cfg`;
    write samples/, results.json, report.md and plots into out_dir; return the results dict."""
    from eval.benchmarks import load_benchmark

    suites = {spec: load_benchmark(spec, cfg.limit) for spec in cfg.benchmarks}
    n_by_spec = {spec: cfg.samples_per_problem(benchmark) for spec, (benchmark, _) in suites.items()}
    model_meta = {label: describe_model(model, cfg.think_prefix) for label, model in models.items()}

    rows: list[dict] = []
    timings: dict[str, dict[str, Any]] = {}
    for label, model in models.items():
        samples, timings[label] = _generate_or_resume(cfg, scratch, label, model, model_meta[label]["think_prefix"],
                                                      suites, n_by_spec, seed)
        for spec in cfg.benchmarks:
            for problem, per_problem in zip(suites[spec][1], samples[spec]):
                rows += [_sample_row(spec, label, problem, idx, sample) for idx, sample in enumerate(per_problem)]
    return grade_score_and_write(rows, _run_meta(cfg, seed, suites, n_by_spec, model_meta, timings), Path(out_dir))


def _run_meta(cfg: EvaluationSettings, seed: int, suites: dict[str, tuple[Any, list[dict]]],
              n_by_spec: dict[str, int], model_meta: dict[str, dict], timings: dict[str, dict[str, Any]]) -> dict:
    """results.json's meta: everything that shaped the numbers, to repeat or re-grade the run."""
    from pipeline.core.env import library_versions

    return {
        "seed": seed,
        "baseline": cfg.baseline or cfg.models[0],
        "preset": cfg.preset,
        # chunk_size too: with bfloat16 weights, what shares a chunk can change a sample's rounding
        "sampling": {**{k: getattr(cfg, k) for k in ("temperature", "top_p", "top_k", "max_tokens", "max_model_len",
                                                     "chunk_size", "tensor_parallel_size", "data_parallel_size")},
                     "dtype": cfg.dtype_choice().dtype},
        "dtype": cfg.dtype_choice().record(),  # what was asked, what ran, and why
        "n": n_by_spec,
        "prompt_template": cfg.template_text,
        # a named template ('r1', 'open-r1') reads as its text; one's own template is its own text
        "prompt_template_name": cfg.prompt_template if cfg.template_text != cfg.prompt_template else "custom",
        "system_prompt": None,
        "models": model_meta,
        "benchmarks": {spec: {"file": str(benchmark.path), "sha256": sha256_files([benchmark.path]),
                              "gold_is_latex": benchmark.gold_is_latex, "problems": len(problems)}
                       for spec, (benchmark, problems) in suites.items()},
        "grader": {"workers": cfg.workers, "timeout_s": cfg.timeout_s},
        "timings_s": timings,
        "versions": library_versions(),
    }


def _sample_row(spec: str, label: str, problem: dict, idx: int, sample: dict) -> dict:
    level = problem.get("level")
    return {"benchmark": spec, "id": problem["id"], "model": label, "sample_idx": idx, "answer": problem["answer"],
            "subject": problem.get("subject"), "level": None if level is None else str(level),
            "completion": sample["text"], "extracted": "", "label": "", "correct": False, "grade_error": "",
            "prompt_tokens": sample["prompt_tokens"], "completion_tokens": sample["completion_tokens"],
            "finish_reason": sample["finish_reason"]}


def _generate_or_resume(cfg: EvaluationSettings, scratch: Path, label: str, model: str, think_prefix: str,
                        suites: dict[str, tuple[Any, list[dict]]], n_by_spec: dict[str, int],
                        seed: int) -> tuple[dict[str, list[list[dict]]], dict[str, Any]]:
    """One model's samples on every benchmark (spec -> per problem -> dicts: text, finish_reason, prompt_tokens,
    completion_tokens) and its engine seconds.

    One engine for all benchmarks, generating chunks of `chunk_size` problems cut per benchmark. Each finished
    chunk is saved in scratch (`_shard_paths`), so a re-run after a kill generates only the chunks not saved yet.
    """
    from dataclasses import asdict

    from pipeline.core.console import progress
    from pipeline.engines import vllm_local
    from pipeline.engines.request import Completion, SamplingRequest, chunk_ranges

    problems = [row for spec in cfg.benchmarks for row in suites[spec][1]]
    prompts = [[{"role": "user", "content": render_prompt(cfg.template_text, row)}] for row in problems]
    ids = [row["id"] for row in problems]
    counts = [n_by_spec[spec] for spec in cfg.benchmarks for _ in suites[spec][1]]
    chunks = chunk_ranges([len(suites[spec][1]) for spec in cfg.benchmarks], cfg.chunk_size)
    settings = dict(**cfg.request_settings(), seed=seed, dtype=cfg.dtype_choice().dtype, think_prefix=think_prefix)
    chunk_problems = [[(ids[p], counts[p], prompts[p]) for p in rows] for rows in chunks]
    paths = _shard_paths(scratch, model, settings, chunk_problems)
    # shards are renamed into place whole: one that exists is complete
    shards = {chunk: json.loads(path.read_text()) for chunk, path in enumerate(paths) if path.exists()}
    (scratch / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    saved = sum(counts[p] for chunk in shards for p in chunks[chunk])  # samples in saved chunks, for the progress row
    with progress(label, total=sum(counts), unit="samples", completed=saved) as bar:
        def save(chunk: int, completions: list[list[Completion]], seconds: float) -> None:
            nonlocal saved
            shards[chunk] = {"ids": [ids[p] for p in chunks[chunk]], "seconds": seconds,
                             "samples": [[asdict(c) for c in per_problem] for per_problem in completions]}
            write_json_atomic(paths[chunk], shards[chunk])
            saved += sum(counts[p] for p in chunks[chunk])
            bar.update(completed=saved)

        request = SamplingRequest(model=model, prompts=prompts, n=counts, ids=ids, chunks=chunks,
                                  skip_chunks=set(shards), **settings)
        if cfg.engine == "ray":
            from pipeline.engines import ray_replicas

            generations = ray_replicas.generate(request, **cfg.ray_settings(), on_chunk=save, on_phase=bar.phase)
        else:
            generations = vllm_local.generate(request, on_chunk=save, on_phase=bar.phase,
                                              on_samples=lambda finished: bar.update(completed=saved + finished))
    per_problem = [samples for chunk in range(len(chunks)) for samples in shards[chunk]["samples"]]
    samples, start = {}, 0
    for spec in cfg.benchmarks:
        samples[spec] = per_problem[start:start + len(suites[spec][1])]
        start += len(suites[spec][1])
    # generate: summed over every run that saved a chunk; load: this run's engine start (0 when all were saved)
    timings = {"load": generations.load_seconds, "generate": sum(shard["seconds"] for shard in shards.values())}
    if cfg.engine == "ray":  # this run's replicas, nodes, retries and throughput
        timings["ray"] = generations.ray_stats()
    return samples, timings


def _shard_paths(scratch: Path, model: str, settings: dict, chunk_problems: list[list[tuple]]) -> list[Path]:
    """Where each chunk's samples are saved: under a hash of everything that shapes them (model, sampling settings,
    seed, and each problem's id, n and prompt), so a chunk made with other settings is never reused."""
    paths = []
    for problems in chunk_problems:
        shaped_by = [model, settings, problems]
        digest = hashlib.sha256(json.dumps(shaped_by, sort_keys=True).encode()).hexdigest()[:16]
        paths.append(scratch / SHARD_DIR / f"{digest}.json")
    return paths


def describe_model(model: str, think_prefix: str | None) -> dict:
    """What results.json records about a model, and the think prefix its prompts get.

    `completion_prefix` is what the grader reads before each completion: the think prefix, or `<think>\\n` when
    the chat template's generation prompt itself opens thinking; either way an unclosed </think> scores nothing.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    template = tokenizer.chat_template
    if not template:
        raise UserError(f"model {model}: its tokenizer has no chat template; evaluation prompts chat models")
    template_text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    prefix = chat.think_prefix(tokenizer, think_prefix)
    path = Path(model)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    weights = sorted(p for pattern in ("*.safetensors", "*.bin", "*.pt") for p in path.glob(pattern)) \
        if path.is_dir() else []
    return {"path": model,
            "weights_sha256": sha256_files(weights) if weights else None,
            "config_dtype": config.get("dtype", config.get("torch_dtype")),
            "chat_template_sha256": hashlib.sha256(template_text.encode()).hexdigest(),
            "think_prefix": prefix.appended,
            "completion_prefix": prefix.completion_prefix}


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over the files' names and bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()
