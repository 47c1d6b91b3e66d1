"""`evaluate` (recipe step): sample models on benchmarks with vLLM, grade with math-verify, and report pass@1 ±
stderr, pass@k, maj@k, truncation and lengths (the evaluation: eval/run.py; its outputs: eval/results.py), and send
the numbers to experiment trackers. `distill eval` (pipeline/commands/eval_command.py) runs the same evaluation
with this Config.

Protocol (DeepSeek-R1 distills, open-r1): the problem and "Please reason step by step, and put your final answer
within \\boxed{}." in one user turn, no system prompt, the model's chat template, and `<think>\\n` after the
generation prompt when the template shows the model thinks. Presets: `r1` (temperature 0.6, top_p 0.95, 32,768
new tokens, n = each benchmark's protocol n: AIME 64, AMC23 16, MATH-500 4, GSM8K 1) and `quick` (a CPU budget:
512 new tokens, n at most 4). Every field set explicitly wins over the preset.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from eval.results import print_table
from eval.run import evaluate_models
from pipeline.core.artifacts import Artifact, Output
from pipeline.core.compute_dtype import DtypeSetting
from pipeline.core.errors import UserError
from pipeline.core.step import repeated
from pipeline.engines.settings import EngineFields, MaxTokens, Temperature, TopP
from pipeline.text.prompts import DEFAULT_PROMPT_TEMPLATE
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


class Config(DtypeSetting, TrackedConfig, EngineFields):
    """The evaluate step's settings (and `distill eval`'s flags): its own below, and the sampling and engine settings
    of `EngineFields` (temperature, top_p, top_k, max_tokens, think_prefix, max_model_len, chunk_size, ..., engine),
    some with this step's defaults."""

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
    # the r1 preset's, which `_apply_preset` fills in where the user set nothing
    temperature: Temperature = PRESETS["r1"]["temperature"]
    top_p: TopP = PRESETS["r1"]["top_p"]
    max_tokens: MaxTokens = Field(default=PRESETS["r1"]["max_tokens"], description=(
        "Most new tokens per sample; longer samples stop with finish_reason 'length' and count as truncated."))
    prompt_template: str = Field(default="r1", description=(
        "User turn: 'r1' (the problem, then the \\boxed{} instruction), 'open-r1' (lighteval's MATH prompt) or "
        "your own text where {column} is replaced by that column of the problem (at least {problem}); other "
        "braces, such as \\boxed{}, are kept."))
    baseline: str | None = Field(default=None, description=(
        "The model every other is compared with, problem by problem (paired difference, 95% paired-bootstrap "
        "interval, minimum detectable difference); null = the first of `models`."))
    limit: int | None = Field(default=None, ge=1, description="Keep only the first N problems of every benchmark.")
    workers: int = Field(default=2, ge=1, description="Grading processes (math-verify).")
    timeout_s: float = Field(default=10.0, gt=0, description="Seconds one sample may take to grade.")
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
    # over equivalent answers, paired comparisons; 4: eval/answers.py's extraction of 2026-12-05 (as verify's 3)
    code_version: ClassVar = "4"

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
