"""`evaluate`: sample each model on each benchmark with vLLM, grade with math-verify, report pass@1 ± stderr.

Writes into the step dir:
    samples/       one row per sample (datasets.save_to_disk): benchmark, id, model, sample_idx, completion,
                   extracted, label, correct, prompt_tokens, completion_tokens, finish_reason
    results.json   {"models": {MODEL: {BENCHMARK: {"pass@1", "stderr", "n", "problems", "labels"}}}, "meta": {...}}
                   MODEL and BENCHMARK are written as in the recipe, in its order.
and prints a models x benchmarks table. Each model's generations are kept in the scratch dir as they finish,
so a run killed during the third model does not sample the first two again.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from typing import ClassVar

from pydantic import Field, field_validator

from pipeline.artifacts import Artifact, Output, write_json_atomic
from pipeline.errors import UserError
from pipeline.steps import StepConfig
from pipeline.steps.sample import DEFAULT_PROMPT_TEMPLATE, render_prompt


class Config(StepConfig):
    models: list[str] = Field(min_length=1, description=(
        "Models to evaluate: builtin:NAME, step:NAME (a model an earlier step trained), a local dir or a hub id."))
    benchmarks: list[str] = Field(min_length=1, description=(
        "Benchmarks: aime24, aime25, amc23, math500, gsm8k, arith_test, or a JSONL/parquet file of problems; "
        "a :N suffix keeps the first N problems (aime24:5)."))
    n: int | None = Field(default=None, ge=1,
                          description="Samples per problem; null = each benchmark's default (AIME 64, MATH-500 4).")
    temperature: float = Field(default=0.6, ge=0, description="Sampling temperature (R1-distill protocol: 0.6).")
    top_p: float = Field(default=0.95, gt=0, le=1, description="Nucleus sampling top_p (protocol: 0.95).")
    max_tokens: int = Field(default=2048, ge=1, description=(
        "Most new tokens per sample. The published protocol uses 32768 for reasoning models; "
        "keep it small on CPU."))
    prompt_template: str = Field(default=DEFAULT_PROMPT_TEMPLATE, description=(
        "User turn, as in the sample step: {column} is replaced by that column of the problem (at least "
        "{problem}); other braces, such as \\boxed{}, are kept."))
    think_prefix: str = Field(default="", description=(
        "Text appended after the chat template's generation prompt, e.g. '<think>\\n' for R1-style models. "
        "When set, a sample that never closes </think> only scores with a \\boxed{} answer."))
    limit: int | None = Field(default=None, ge=1, description="Keep only the first N problems of every benchmark.")
    workers: int = Field(default=2, ge=1, description="Grading processes (math-verify).")
    timeout_s: float = Field(default=10.0, gt=0, description="Seconds one sample may take to grade.")

    produces: ClassVar[str] = "report"
    dry_run_overrides: ClassVar[dict] = {"limit": 2, "n": 2, "max_tokens": 16}

    def model_refs(self) -> list[str]:
        return list(self.models)

    @field_validator("models", "benchmarks")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {repeated}")
        return names

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
        if "{problem}" not in template:
            raise ValueError("prompt_template must contain {problem}")
        return template


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    import datasets

    from eval.benchmarks import load_benchmark
    from eval.grader import grade_many
    from eval.metrics import pass_at_1
    from pipeline.env import library_versions
    from pipeline.models import resolve_model

    suites = {spec: load_benchmark(spec, cfg.limit) for spec in cfg.benchmarks}
    samples_per_problem = {spec: cfg.n or benchmark.default_n for spec, (benchmark, _) in suites.items()}

    # one engine start per model and distinct n: benchmarks that share n share a generate call
    specs_by_n: dict[int, list[str]] = defaultdict(list)
    for spec in cfg.benchmarks:
        specs_by_n[samples_per_problem[spec]].append(spec)

    # model -> benchmark -> one list of sample dicts per problem
    generated: dict[str, dict[str, list[list[dict]]]] = {}
    timings: dict[str, Counter] = {}
    for model_index, ref in enumerate(cfg.models):
        model_dir = resolve_model(ref, inputs)
        generated[ref], timings[ref] = {}, Counter()
        for n, specs in specs_by_n.items():
            problems = [(spec, row) for spec in specs for row in suites[spec][1]]
            per_problem, seconds = _generate_or_resume(cfg, out, model_dir, f"{model_index}-n{n}", problems, n)
            timings[ref].update(seconds)
            for (spec, _), samples in zip(problems, per_problem):
                generated[ref].setdefault(spec, []).append(samples)

    rows: list[dict] = []
    results: dict[str, dict[str, dict]] = {ref: {} for ref in cfg.models}
    for spec, (benchmark, problems) in suites.items():
        flat = [(ref, problem, idx, sample)
                for ref in cfg.models
                for problem, samples in zip(problems, generated[ref][spec])
                for idx, sample in enumerate(samples)]
        # the think prefix was part of the prompt: grading must see that the sample started inside <think>
        grades = grade_many([cfg.think_prefix + s["text"] for *_, s in flat], [p["answer"] for _, p, _, _ in flat],
                            workers=cfg.workers, timeout_s=cfg.timeout_s,
                            finish_reasons=[s["finish_reason"] for *_, s in flat],
                            gold_is_latex=benchmark.gold_is_latex)
        correct: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        labels: dict[str, Counter] = defaultdict(Counter)
        for (ref, problem, idx, sample), result in zip(flat, grades):
            correct[ref][problem["id"]].append(result.correct)
            labels[ref][result.label] += 1
            rows.append({"benchmark": spec, "id": problem["id"], "model": ref, "sample_idx": idx,
                         "completion": sample["text"], "extracted": result.extracted, "label": result.label,
                         "correct": result.correct, "prompt_tokens": sample["prompt_tokens"],
                         "completion_tokens": sample["completion_tokens"], "finish_reason": sample["finish_reason"]})
        for ref in cfg.models:
            mean, stderr = pass_at_1(list(correct[ref].values()))
            results[ref][spec] = {"pass@1": mean, "stderr": stderr if math.isfinite(stderr) else None,
                                  "n": samples_per_problem[spec], "problems": len(problems),
                                  "labels": dict(labels[ref])}

    datasets.Dataset.from_list(rows).save_to_disk(str(out.dir / "samples"))
    meta = {
        "seed": out.seed, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
        "prompt_template": cfg.prompt_template, "think_prefix": cfg.think_prefix,
        "benchmark_files": {spec: str(benchmark.path) for spec, (benchmark, _) in suites.items()},
        "timings_s": {ref: dict(t) for ref, t in timings.items()}, "versions": library_versions(),
    }
    write_json_atomic(out.dir / "results.json", {"models": results, "meta": meta})
    print_table(results)
    summary = {f"{ref} {spec} pass@1": scores["pass@1"]
               for ref, per_bench in results.items() for spec, scores in per_bench.items()}
    return out.report_written(samples=len(rows), **summary)


def _generate_or_resume(cfg: Config, out: Output, model_dir: str, part: str, problems: list[tuple[str, dict]],
                        n: int) -> tuple[list[list[dict]], dict[str, float]]:
    """Samples for each problem (dicts: text, finish_reason, prompt_tokens, completion_tokens) and engine timings."""
    from dataclasses import asdict

    from pipeline.generation import generate

    saved = out.scratch / f"generations-{part}.json"
    if saved.exists():
        kept = json.loads(saved.read_text())
        return kept["samples"], kept["seconds"]
    prompts = [[{"role": "user", "content": render_prompt(cfg.prompt_template, row)}] for _, row in problems]
    generations = generate(model_dir, prompts, n=n, temperature=cfg.temperature, top_p=cfg.top_p,
                           max_tokens=cfg.max_tokens, seed=out.seed, think_prefix=cfg.think_prefix)
    samples = [[asdict(c) for c in per_prompt] for per_prompt in generations]
    seconds = {"load": generations.load_seconds, "generate": generations.generate_seconds}
    out.scratch.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, {"samples": samples, "seconds": seconds})
    return samples, seconds


def print_table(results: dict[str, dict[str, dict]]) -> None:
    """Models x benchmarks, pass@1 ± stderr in percent."""
    from rich.console import Console
    from rich.table import Table

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
    Console().print(table)
