"""`evaluate` (recipe step) and `distill eval` (command): sample models on benchmarks with vLLM, grade with
math-verify, and report pass@1 ± stderr, pass@k, maj@k, truncation and lengths. Both run `evaluate_models`.

Protocol (DeepSeek-R1 distills, open-r1): the problem and "Please reason step by step, and put your final answer
within \\boxed{}." in one user turn, no system prompt, the model's chat template, and `<think>\\n` after the
generation prompt when the template shows the model thinks. Presets: `r1` (temperature 0.6, top_p 0.95, 32,768
new tokens, n = each benchmark's protocol n: AIME 64, AMC23 16, MATH-500 4, GSM8K 1) and `quick` (a CPU budget:
512 new tokens, n at most 4). Every field set explicitly wins over the preset.

Writes into the output dir:
    samples/       one row per sample (datasets.save_to_disk): benchmark, id, model, sample_idx, answer, subject,
                   level, completion, extracted, label, correct, prompt_tokens, completion_tokens, finish_reason
    results.json   {"models": {LABEL: {BENCHMARK: {"pass@1", "stderr", "n", "pass@k", "maj@k", ...}}},
                    "meta": {seed, sampling, n, prompt template, per model path / weights and chat-template
                    sha256 / think prefix, benchmark files and sha256, library versions}}
                   LABEL and BENCHMARK are written as the user named them, in the order given.
    report.md, accuracy.png, lengths.png   (eval/report.py)
Resume: each model generates on one engine, in chunks of `chunk_size` problems cut per benchmark (no chunk
spans two benchmarks), and each finished chunk is saved in a scratch dir, so a killed run loses at most the
chunk it was generating. `distill eval --rescore DIR` re-grades samples/ and rewrites the rest.

Determinism: sample k of a problem is drawn with its own seed from (seed, problem id, k), and a benchmark's
chunks hold the same problems whatever other benchmarks (and their limits) share the run, each chunk computed
on its own (no prefix cache carried from one chunk to the next). So a benchmark's samples do not depend on the other
benchmarks, on the order of benchmarks or models, or on a kill and resume. They do depend on the model, the
prompt, the sampling settings and the seed; and, through rounding, with bfloat16 weights (vLLM's default on CPU)
on what shares a problem's chunk: another `chunk_size`, n or limit on the same benchmark can change some samples
(see pipeline/engines/generation.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.core.artifacts import Artifact, Output, write_json_atomic
from pipeline.core.compute_dtype import DtypeSetting
from pipeline.core.errors import UserError
from pipeline.core.outputs import EVAL, claim_dir, make_dir, never_written, remove_made
from pipeline.core.step import repeated
from pipeline.engines.ray_engine import EngineFields
from pipeline.text import chat
from pipeline.text.prompts import DEFAULT_PROMPT_TEMPLATE, render_prompt
from pipeline.training.config import TrackedConfig

# lighteval's MATH prompt, used by open-r1's evaluation
OPEN_R1_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of the "
    "following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' (without quotes) "
    "where ANSWER is just the final number or expression that solves the problem. Think step by step before "
    "answering.\n\n{problem}")
PROMPT_TEMPLATES = {"r1": DEFAULT_PROMPT_TEMPLATE, "open-r1": OPEN_R1_TEMPLATE}
# Settings a preset fills in where the user set nothing. n is per benchmark: see Config.samples_per_problem.
PRESETS: dict[str, dict[str, Any]] = {
    "r1": {"temperature": 0.6, "top_p": 0.95, "max_tokens": 32768},
    "quick": {"temperature": 0.6, "top_p": 0.95, "max_tokens": 512},
}
QUICK_MAX_N = 4
SAMPLES_DIR = "samples"
SHARD_DIR = "chunks"  # in scratch: one file per finished chunk
RESULTS_JSON = "results.json"


class Config(DtypeSetting, TrackedConfig, EngineFields):
    models: list[str] = Field(min_length=1, description=(
        "Models to evaluate: builtin:NAME, step:NAME (a model an earlier step trained), a local dir or a hub id."))
    benchmarks: list[str] = Field(min_length=1, description=(
        "Benchmarks: aime24, aime25, amc23, math500, gsm8k, arith_test, or a JSONL/parquet file of problems; "
        "a :N suffix keeps the first N problems (aime24:5)."))
    preset: Literal["r1", "quick"] = Field(default="r1", description=(
        "Defaults for the fields you do not set. r1: temperature 0.6, top_p 0.95, 32768 new tokens, n = the "
        "benchmark's protocol n (AIME 64, AMC23 16, MATH-500 4, GSM8K 1). quick: 512 new tokens, n at most 4 "
        "(a CPU budget)."))
    n: int | None = Field(default=None, ge=1, description=(
        "Samples per problem for every benchmark; null = the preset's n for each benchmark."))
    temperature: float = Field(default=PRESETS["r1"]["temperature"], ge=0, description="Sampling temperature.")
    top_p: float = Field(default=PRESETS["r1"]["top_p"], gt=0, le=1, description="Nucleus sampling top_p.")
    top_k: int = Field(default=-1, ge=-1, description="Keep only the k most likely tokens; -1 keeps all.")
    max_tokens: int = Field(default=PRESETS["r1"]["max_tokens"], ge=1, description=(
        "Most new tokens per sample; longer samples stop with finish_reason 'length' and count as truncated."))
    max_model_len: int | None = Field(default=None, ge=1, description=(
        "Longest prompt + completion in tokens; default: the model's own limit."))
    prompt_template: str = Field(default="r1", description=(
        "User turn: 'r1' (the problem, then the \\boxed{} instruction), 'open-r1' (lighteval's MATH prompt) or "
        "your own text where {column} is replaced by that column of the problem (at least {problem}); other "
        "braces, such as \\boxed{}, are kept."))
    think_prefix: str | None = Field(default=None, description=(
        "Text appended after the chat template's generation prompt. null = from the chat template: '<think>\\n' "
        "when it handles </think> (R1-style), nothing otherwise. A sample that opened thinking and never closed "
        "</think> only scores with a \\boxed{} answer."))
    baseline: str | None = Field(default=None, description=(
        "The model every other is compared with, problem by problem (paired difference, 95% paired-bootstrap "
        "interval, minimum detectable difference); null = the first of `models`."))
    limit: int | None = Field(default=None, ge=1, description="Keep only the first N problems of every benchmark.")
    chunk_size: int = Field(default=64, ge=1, description=(
        "Problems per chunk, cut per benchmark: each finished chunk is saved, so a killed run re-generates at "
        "most one. With bfloat16 weights another chunk size can change some samples by rounding."))
    workers: int = Field(default=2, ge=1, description="Grading processes (math-verify).")
    timeout_s: float = Field(default=10.0, gt=0, description="Seconds one sample may take to grade.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs each model is split over (vLLM).")
    data_parallel_size: int = Field(default=1, ge=1, description=(
        "Engine replicas, each on its own GPUs, sharing the prompts (vLLM data parallelism)."))
    distributed_executor_backend: str | None = Field(default=None, description=(
        "vLLM's executor for multi-GPU runs: 'mp' (one node) or 'ray' (across nodes); null = vLLM's choice."))
    report_to: str | list[str] = Field(default="none", description=(
        "Experiment trackers the results go to, with the step's config: none, tensorboard (event files in the "
        "step's runs/), trackio (a local database, $TRACKIO_DIR), wandb, or a list. Logged: pass@1 and its "
        "stderr per model and benchmark, and each model's paired difference to the baseline. The run is named "
        "<recipe>/<step>."))

    produces: ClassVar[str] = "report"
    dry_run_overrides: ClassVar[dict] = {"limit": 2, "n": 2, "max_tokens": 16}
    path_fields: ClassVar = ()
    libraries: ClassVar = ("vllm", "torch", "transformers", "math-verify", "latex2sympy2_extended")
    # 2: one seeded request per sample, chunks per benchmark; 3: ungraded samples leave the denominator, maj@k
    # over equivalent answers, paired comparisons
    code_version: ClassVar = "3"

    def input_paths(self) -> list[str]:
        from eval.benchmarks import get_benchmark

        return [str(get_benchmark(spec).path) for spec in self.benchmarks]

    def model_refs(self) -> list[str]:
        return list(self.models)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset", "r1") in PRESETS:
            return {**PRESETS[data.get("preset", "r1")], **data}  # what the user set wins
        return data

    @field_validator("models", "benchmarks")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if repeated(names):
            raise ValueError(f"listed more than once: {repeated(names)}")
        return names

    @model_validator(mode="after")
    def _baseline_is_a_model(self) -> "Config":
        if self.baseline is not None and self.baseline not in self.models:
            raise ValueError(f"baseline {self.baseline!r} is not one of models {self.models}")
        return self

    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, specs: list[str]) -> list[str]:
        from eval.benchmarks import get_benchmark

        for spec in specs:
            try:
                get_benchmark(spec)
            except UserError as error:
                raise ValueError(str(error)) from None
        return specs

    @field_validator("prompt_template")
    @classmethod
    def _has_problem(cls, template: str) -> str:
        if template not in PROMPT_TEMPLATES and "{problem}" not in template:
            raise ValueError(f"prompt_template must be one of {list(PROMPT_TEMPLATES)} or contain {{problem}}")
        return template

    @property
    def template_text(self) -> str:
        return PROMPT_TEMPLATES.get(self.prompt_template, self.prompt_template)

    def samples_per_problem(self, benchmark) -> int:
        if self.n is not None:
            return self.n
        return min(benchmark.default_n, QUICK_MAX_N) if self.preset == "quick" else benchmark.default_n


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    from pipeline.core.models import resolve_model

    models = {ref: resolve_model(ref, inputs) for ref in cfg.models}
    results = evaluate_models(cfg, models, out.dir, out.scratch, out.seed)
    print_table(results)
    report_to_trackers(cfg, results, out)
    summary = {f"{ref} {spec} pass@1": scores["pass@1"]
               for ref, per_bench in results["models"].items() for spec, scores in per_bench.items()}
    ray_runs = {label: timings["ray"] for label, timings in results["meta"]["timings_s"].items() if "ray" in timings}
    return out.report_written(samples=sum(s["samples"] for p in results["models"].values() for s in p.values()),
                              **summary, **({"ray": ray_runs} if ray_runs else {}))


def evaluate_models(cfg: Config, models: dict[str, str], out_dir: Path, scratch: Path, seed: int) -> dict:
    """Generate, grade and score every model (label -> resolved dir or hub id) on every benchmark of `cfg`;
    write samples/, results.json, report.md and plots into out_dir; return the results dict."""
    from eval.benchmarks import load_benchmark
    from pipeline.core.env import library_versions

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

    meta = {
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
        "prompt_template_name": cfg.prompt_template if cfg.prompt_template in PROMPT_TEMPLATES else "custom",
        "system_prompt": None,
        "models": model_meta,
        "benchmarks": {spec: {"file": str(benchmark.path), "sha256": _sha256_files([benchmark.path]),
                              "gold_is_latex": benchmark.gold_is_latex, "problems": len(problems)}
                       for spec, (benchmark, problems) in suites.items()},
        "grader": {"workers": cfg.workers, "timeout_s": cfg.timeout_s},
        "timings_s": timings,
        "versions": library_versions(),
    }
    return _grade_score_and_write(rows, meta, Path(out_dir))


def rescore(run_dir: Path, *, workers: int | None = None, timeout_s: float | None = None) -> dict:
    """Re-grade a finished evaluation's saved completions (no generation) and rewrite its outputs."""
    from pipeline.core.env import library_versions

    run_dir = Path(run_dir)
    meta, rows = _read_evaluation(run_dir)
    if workers is not None or timeout_s is not None:
        meta["grader"] = {"workers": workers or meta["grader"]["workers"],
                          "timeout_s": timeout_s or meta["grader"]["timeout_s"]}
    meta["rescored"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": library_versions()}
    return _grade_score_and_write(rows, meta, run_dir)


# what re-grading reads of each sample (the rest it writes)
SAMPLE_COLUMNS = ("benchmark", "id", "model", "sample_idx", "answer", "completion", "finish_reason",
                  "completion_tokens")


def _read_evaluation(run_dir: Path) -> tuple[dict, list[dict]]:
    """The meta of an evaluation's results.json and its samples' rows, checked for everything re-grading reads: a
    results.json or samples/ that is not an evaluation's is refused naming it and what is wrong."""
    import datasets

    results_path, samples_path = run_dir / RESULTS_JSON, run_dir / SAMPLES_DIR
    if not results_path.is_file() or not samples_path.is_dir():
        raise UserError(f"--rescore {run_dir}: not an evaluation output (needs {RESULTS_JSON} and {SAMPLES_DIR}/)")
    try:
        document = json.loads(results_path.read_text())
    except (OSError, ValueError) as error:  # a UnicodeDecodeError is a ValueError
        raise UserError(f"{results_path}: cannot be read as JSON ({error})") from None
    meta = document.get("meta") if isinstance(document, dict) else None
    problem = _meta_problem(meta)
    if problem:
        raise UserError(f"{results_path}: not the results.json of an evaluation: {problem}")
    try:
        samples = datasets.load_from_disk(str(samples_path))
    except (OSError, ValueError, KeyError, TypeError) as error:  # what datasets raises for a dir it did not save
        raise UserError(f"{samples_path}: not a saved dataset ({error})") from None
    missing = [column for column in SAMPLE_COLUMNS if column not in samples.column_names]
    if missing:
        raise UserError(f"{samples_path}: not the samples of an evaluation (no column {', '.join(missing)})")
    rows = samples.to_list()
    for row in rows:
        if row["model"] not in meta["models"] or row["benchmark"] not in meta["n"]:
            raise UserError(f"{samples_path}: row id {row['id']!r}: model {row['model']!r} or benchmark "
                            f"{row['benchmark']!r} is not one of {results_path}'s meta")
    return meta, rows


def _meta_problem(meta) -> str | None:
    """What in a results.json's meta re-grading could not read, or None."""
    if not isinstance(meta, dict):
        return "no `meta`"
    models, n, benchmarks, grader = (meta.get(key) for key in ("models", "n", "benchmarks", "grader"))
    if not isinstance(models, dict) or not models or not all(
            isinstance(model, dict) and isinstance(model.get("completion_prefix"), str) for model in models.values()):
        return "meta.models is not model -> {completion_prefix, ...}"
    if not isinstance(n, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                          for v in n.values()):
        return "meta.n is not benchmark -> samples per problem"
    if not isinstance(benchmarks, dict) or not all(
            isinstance(benchmarks.get(spec), dict) and isinstance(benchmarks[spec].get("gold_is_latex"), bool)
            for spec in n):
        return "meta.benchmarks is not benchmark -> {gold_is_latex, ...} for every benchmark of meta.n"
    if not isinstance(grader, dict) or not all(isinstance(grader.get(key), (int, float)) and grader[key] > 0
                                               for key in ("workers", "timeout_s")):
        return "meta.grader is not {workers, timeout_s}"
    if not isinstance(meta.get("seed"), int) or isinstance(meta.get("seed"), bool):
        return "meta.seed is not an integer"
    return None


def _grade_score_and_write(rows: list[dict], meta: dict, out_dir: Path) -> dict:
    """Grade rows in place (per model's completion prefix, per benchmark's gold format), score them, compare every
    model with the baseline on the same problems, and write the outputs."""
    import datasets

    from eval.grading_pool import iter_grades
    from eval.metrics import benchmark_scores, compare_to_baseline, removed_problems
    from eval.report import write_report
    from pipeline.core.console import progress

    completions = [meta["models"][r["model"]]["completion_prefix"] + r["completion"] for r in rows]
    gold_format = [meta["benchmarks"][r["benchmark"]]["gold_is_latex"] for r in rows]
    with progress("grading", total=len(rows), unit="samples") as bar:
        for gold_is_latex in dict.fromkeys(gold_format):  # one worker pool per gold format
            indices = [i for i, is_latex in enumerate(gold_format) if is_latex == gold_is_latex]
            grades = iter_grades([completions[i] for i in indices], [rows[i]["answer"] for i in indices],
                                 workers=meta["grader"]["workers"], timeout_s=meta["grader"]["timeout_s"],
                                 finish_reasons=[rows[i]["finish_reason"] for i in indices],
                                 gold_is_latex=gold_is_latex)
            for position, grade in grades:
                rows[indices[position]].update(extracted=grade.extracted, label=grade.label, correct=grade.correct,
                                               grade_error=grade.error)
                bar.advance()
        bar.phase("grouping equivalent answers (maj@k)")
        groups = _answer_groups(rows, meta["grader"])

    results: dict[str, dict[str, dict]] = {label: {} for label in meta["models"]}
    for spec, n in meta["n"].items():
        benchmark_rows = [r for r in rows if r["benchmark"] == spec]
        removed = removed_problems(benchmark_rows)  # the same problems leave every model's score
        for label in meta["models"]:
            results[label][spec] = benchmark_scores([r for r in benchmark_rows if r["model"] == label], n,
                                                    groups=groups[(label, spec)], removed=removed)
    document = {"models": results, "meta": meta}
    if len(results) > 1:
        # runs from before comparisons existed have no baseline recorded: theirs was the first model
        meta.setdefault("baseline", next(iter(results)))
        document["comparisons"] = compare_to_baseline(results, meta["baseline"], seed=meta["seed"])
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_samples(datasets.Dataset.from_list(rows), out_dir / SAMPLES_DIR)
    write_json_atomic(out_dir / RESULTS_JSON, document)
    write_report(document, rows, out_dir)
    return document


def _answer_groups(rows: list[dict], grader: dict) -> dict[tuple[str, str], dict[str, list[int]]]:
    """(model, benchmark) -> problem id -> the maj@k answer group of each graded sample, in sample order, grouped
    by math-verify equivalence in the grading pool (a problem it cannot group in time is grouped by text)."""
    from eval.grading_pool import iter_answer_groups
    from eval.metrics import graded_by_problem, text_groups

    rows_by_pair: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        rows_by_pair[(row["model"], row["benchmark"])].append(row)
    keys, answers = [], []
    for (model, spec), pair_rows in rows_by_pair.items():
        for problem_id, samples in graded_by_problem(pair_rows).items():
            keys.append((model, spec, problem_id))
            answers.append([s["extracted"] or "" for s in samples])
    groups: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(dict)
    for index, problem_groups in iter_answer_groups(answers, workers=grader["workers"], timeout_s=grader["timeout_s"]):
        model, spec, problem_id = keys[index]
        groups[(model, spec)][problem_id] = text_groups(answers[index]) if problem_groups is None else problem_groups
    return groups


def _save_samples(dataset, path: Path) -> None:
    # next to the old copy, then swapped: a crash while rescoring never leaves samples/ half written
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp), num_shards=1)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _sample_row(spec: str, label: str, problem: dict, idx: int, sample: dict) -> dict:
    level = problem.get("level")
    return {"benchmark": spec, "id": problem["id"], "model": label, "sample_idx": idx, "answer": problem["answer"],
            "subject": problem.get("subject"), "level": None if level is None else str(level),
            "completion": sample["text"], "extracted": "", "label": "", "correct": False, "grade_error": "",
            "prompt_tokens": sample["prompt_tokens"], "completion_tokens": sample["completion_tokens"],
            "finish_reason": sample["finish_reason"]}


def _generate_or_resume(cfg: Config, scratch: Path, label: str, model: str, think_prefix: str,
                        suites: dict[str, tuple[Any, list[dict]]], n_by_spec: dict[str, int],
                        seed: int) -> tuple[dict[str, list[list[dict]]], dict[str, Any]]:
    """One model's samples on every benchmark (spec -> per problem -> dicts: text, finish_reason, prompt_tokens,
    completion_tokens) and its engine seconds.

    One engine for all benchmarks, generating chunks of `chunk_size` problems cut per benchmark. Each finished
    chunk is saved in scratch under a hash of everything that shapes its samples (model, sampling settings,
    seed, and each problem's id, n and prompt), so a re-run after a kill generates only the chunks not saved
    yet, and never reuses a chunk made with other settings.
    """
    from dataclasses import asdict

    from pipeline.core.console import progress
    from pipeline.engines import generation

    problems = [row for spec in cfg.benchmarks for row in suites[spec][1]]
    prompts = [[{"role": "user", "content": render_prompt(cfg.template_text, row)}] for row in problems]
    ids = [row["id"] for row in problems]
    counts = [n_by_spec[spec] for spec in cfg.benchmarks for _ in suites[spec][1]]
    chunks = generation.chunk_ranges([len(suites[spec][1]) for spec in cfg.benchmarks], cfg.chunk_size)
    request = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_tokens,
                   seed=seed, max_model_len=cfg.max_model_len, dtype=cfg.dtype_choice().dtype, think_prefix=think_prefix,
                   tensor_parallel_size=cfg.tensor_parallel_size, data_parallel_size=cfg.data_parallel_size,
                   distributed_executor_backend=cfg.distributed_executor_backend)
    paths = []
    for rows in chunks:
        shaped_by = [model, request, [(ids[p], counts[p], prompts[p]) for p in rows]]
        digest = hashlib.sha256(json.dumps(shaped_by, sort_keys=True).encode()).hexdigest()[:16]
        paths.append(scratch / SHARD_DIR / f"{digest}.json")
    # shards are renamed into place whole: one that exists is complete
    shards = {chunk: json.loads(path.read_text()) for chunk, path in enumerate(paths) if path.exists()}
    (scratch / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    saved = sum(counts[p] for chunk in shards for p in chunks[chunk])  # samples in saved chunks, for the progress row
    with progress(label, total=sum(counts), unit="samples", completed=saved) as bar:
        def save(chunk: int, completions: list[list[generation.Completion]], seconds: float) -> None:
            nonlocal saved
            shards[chunk] = {"ids": [ids[p] for p in chunks[chunk]], "seconds": seconds,
                             "samples": [[asdict(c) for c in per_problem] for per_problem in completions]}
            write_json_atomic(paths[chunk], shards[chunk])
            saved += sum(counts[p] for p in chunks[chunk])
            bar.update(completed=saved)

        chunked = dict(n=counts, ids=ids, chunks=chunks, skip_chunks=set(shards), on_chunk=save, on_phase=bar.phase)
        if cfg.engine == "ray":
            from pipeline.engines import ray_engine

            generations = ray_engine.generate(model, prompts, **cfg.ray_settings(), **chunked, **request)
        else:
            generations = generation.generate(model, prompts, **chunked, **request,
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


def report_to_trackers(cfg: Config, document: dict, out: Output) -> None:
    """The results' `tracked_metrics`, with the step's config and seed, to each tracker in `report_to`, as one run
    named like a training step's (`pipeline.training.tracking.tracking_run`)."""
    import importlib

    from pipeline.training.tracking import TENSORBOARD_DIR, trackers, tracking_run

    metrics = tracked_metrics(document)
    config = {**cfg.model_dump(mode="json"), "seed": out.seed}
    project, run_name = tracking_run(out)
    for tracker in trackers(cfg.report_to):
        if tracker == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=str(out.dir / TENSORBOARD_DIR)) as writer:
                writer.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```")
                for name, value in metrics.items():
                    writer.add_scalar(name, value, global_step=0)
        else:  # trackio's API is wandb's
            client = importlib.import_module(tracker)
            client.init(project=project, name=run_name, config=config)
            client.log(metrics)
            client.finish()


def tracked_metrics(document: dict) -> dict[str, float]:
    """`<benchmark>/pass@1/<model>` and its stderr for every model, `<benchmark>/minus_<baseline>/<model>` (the paired
    difference, in [-1, 1]) and its stderr for every other model: the numbers a tracker plots and compares."""
    metrics = {}
    for label, per_bench in document["models"].items():
        for spec, scores in per_bench.items():
            metrics[f"{spec}/pass@1/{label}"] = scores["pass@1"]
            if scores["stderr"] is not None:
                metrics[f"{spec}/pass@1_stderr/{label}"] = scores["stderr"]
    for spec, rows in document.get("comparisons", {}).items():
        for label, row in rows.items():
            metrics[f"{spec}/minus_{row['baseline']}/{label}"] = row["difference"]
            if row["stderr"] is not None:
                metrics[f"{spec}/minus_{row['baseline']}_stderr/{label}"] = row["stderr"]
    return metrics


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
            "weights_sha256": _sha256_files(weights) if weights else None,
            "config_dtype": config.get("dtype", config.get("torch_dtype")),
            "chat_template_sha256": hashlib.sha256(template_text.encode()).hexdigest(),
            "think_prefix": prefix.appended,
            "completion_prefix": prefix.completion_prefix}


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()


def print_table(document: dict) -> None:
    """Models x benchmarks, pass@1 ± stderr in percent; then each model minus the baseline, paired."""
    from rich.table import Table

    from pipeline.core.console import user_console

    results = document["models"]
    specs = list(next(iter(results.values())))
    table = Table(title="pass@1 (%) ± stderr")
    table.add_column("model")
    for spec in specs:
        table.add_column(spec, justify="right")
    for ref, per_bench in results.items():
        cells = []
        for spec in specs:
            scores = per_bench[spec]
            stderr = f" ± {100 * scores['stderr']:.1f}" if scores["stderr"] is not None else ""
            cells.append(f"{100 * scores['pass@1']:.1f}{stderr}  (n={scores['n']})")
        table.add_row(ref, *cells)
    console = user_console()  # the run's headline: on the terminal, also while the step's output goes to its log
    console.print(table)
    comparisons = document.get("comparisons")
    if not comparisons:
        return
    baseline = next(iter(next(iter(comparisons.values())).values()))["baseline"]
    table = Table(title=f"minus {baseline}, paired over problems (points)")
    for column in ("model", "benchmark", "difference ± stderr", "95% bootstrap", "detectable", "MDD"):
        table.add_column(column, justify="left" if column in ("model", "benchmark", "detectable") else "right")
    for spec in specs:
        for ref, row in comparisons[spec].items():
            low, high = row["ci95"]
            stderr = f" ± {100 * row['stderr']:.1f}" if row["stderr"] is not None else ""
            table.add_row(ref, spec, f"{100 * row['difference']:+.1f}{stderr}",
                          f"[{100 * low:+.1f}, {100 * high:+.1f}]",
                          "yes" if row["detectable"] else "no detectable difference",
                          "–" if row["mdd"] is None else f"{100 * row['mdd']:.1f}")
    console.print(table)


# ---- `distill eval` ----

# Config fields the command takes as --flags (the rest: models, --benchmarks, and the step's own keys)
CLI_FIELDS = ("baseline", "preset", "n", "temperature", "top_p", "top_k", "max_tokens", "max_model_len", "dtype",
              "prompt_template", "think_prefix", "limit", "chunk_size", "workers", "timeout_s",
              "tensor_parallel_size", "data_parallel_size", "distributed_executor_backend", "engine", "replicas",
              "batch_size", "ray_address")


def add_cli_arguments(parser) -> None:
    """`distill eval`'s arguments: one --flag per sampling/grading field of Config, with its help text."""
    parser.add_argument("models", nargs="*", metavar="MODEL", help=(
        "builtin:NAME, a local model dir, a hub id, or a recipe step dir (runs/<recipe>/<step>, its model/)"))
    parser.add_argument("--benchmarks", metavar="B[:N],...", help=(
        "comma-separated: aime24, aime25, amc23, math500, gsm8k, arith_test or a .jsonl/.parquet file; "
        ":N keeps the first N problems"))
    parser.add_argument("--out", metavar="DIR", help="output dir (default runs/eval/<date>-<time>)")
    parser.add_argument("--seed", type=int, default=0, help=(
        "sampling seed: sample k of a problem draws from a seed made of it, the problem id and k (default 0)"))
    parser.add_argument("--rescore", metavar="DIR", help=(
        "re-grade the saved completions of an earlier run in DIR (no generation) and rewrite its results"))
    for name in CLI_FIELDS:
        field = Config.model_fields[name]
        # argparse formats help strings with %: a literal one ("95% interval") is written %%
        parser.add_argument("--" + name.replace("_", "-"), dest=name, metavar="VALUE",
                            help=(field.description or "").replace("%", "%%"))


def run_cli(args) -> int:
    if args.rescore:
        claim_dir(Path(args.rescore), EVAL_OUTPUTS, EVAL, overwrite=args.overwrite,
                  never=never_written(Path(args.rescore)))
        document = rescore(Path(args.rescore), workers=_positive(args.workers, "--workers", int),
                           timeout_s=_positive(args.timeout_s, "--timeout-s", float))
        print_table(document)
        print(f"rescored → {args.rescore}")
        return 0
    if not args.models or not args.benchmarks:
        raise UserError("distill eval needs MODEL(s) and --benchmarks (or --rescore DIR)")
    settings = {name: getattr(args, name) for name in CLI_FIELDS if getattr(args, name) is not None}
    try:
        cfg = Config(uses="evaluate", models=args.models,
                     benchmarks=[b.strip() for b in args.benchmarks.split(",") if b.strip()], **settings)
    except ValidationError as error:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                             for e in error.errors())
        raise UserError(f"distill eval: {problems}") from None
    out_dir = Path(args.out or Path("runs") / "eval" / time.strftime("%Y%m%d-%H%M%S"))
    read = [Path(path).expanduser() for path in [*cfg.input_paths(), *cfg.models] if Path(path).expanduser().exists()]
    claim_dir(out_dir, EVAL_OUTPUTS, EVAL, overwrite=args.overwrite, never=never_written(out_dir, read=read))
    models = {ref: resolve_cli_model(ref) for ref in cfg.models}
    made = make_dir(out_dir, EVAL, "--out")
    scratch = out_dir / ".scratch"
    try:
        document = evaluate_models(cfg, models, out_dir, scratch, args.seed)
    except UserError:
        remove_made(out_dir, made)  # a refused evaluation leaves nothing behind
        raise
    shutil.rmtree(scratch, ignore_errors=True)  # everything is in samples/ now
    print_table(document)
    print(f"results → {out_dir / RESULTS_JSON}, report → {out_dir / 'report.md'}")
    return 0


# What `distill eval` writes into --out (and --rescore rewrites), each checked before anything is written.
EVAL_OUTPUTS = (RESULTS_JSON, SAMPLES_DIR, SAMPLES_DIR + ".tmp", "report.md", "accuracy.png", "lengths.png",
                ".scratch")


def _positive(value: str | None, flag: str, kind: type) -> int | float | None:
    if value is None:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise UserError(f"{flag} must be a positive {kind.__name__}, got {value!r}")
    return number


def resolve_cli_model(ref: str) -> str:
    """A model the command can load: a recipe step dir means its model/; everything else as in recipes."""
    from pipeline.core.artifacts import read_manifest
    from pipeline.core.models import STEP_PREFIX, resolve_model

    path = Path(ref).expanduser()
    if (path / "manifest.json").is_file():
        manifest = read_manifest(path)
        if manifest.get("produces") != "model":
            raise UserError(f"{ref}: step {manifest.get('step')!r} produced a {manifest.get('produces')}, "
                            "not a model")
        return str((path / "model").resolve())
    if ref.startswith(STEP_PREFIX):
        raise UserError(f"{ref}: step:NAME only works inside a recipe; pass the step's dir (runs/<recipe>/<step>)")
    return resolve_model(ref)
