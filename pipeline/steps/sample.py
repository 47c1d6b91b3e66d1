"""`sample`: n completions per problem from a model, with vLLM, into the `samples` contract.

Each problem row comes out n times, contiguous and in input order, with all its columns plus
`sample_idx`, `prompt` (the chat messages sent), `completion`, `finish_reason`, `prompt_tokens`,
`completion_tokens` and `model` (the reference as the recipe wrote it). The engine is seeded with the
recipe seed, so the same recipe gives the same samples.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from pipeline.artifacts import Artifact, Output
from pipeline.errors import UserError
from pipeline.steps import StepConfig

DEFAULT_PROMPT_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
SAMPLE_COLUMNS = ("sample_idx", "prompt", "completion", "finish_reason", "prompt_tokens", "completion_tokens",
                  "model")
# {name} placeholders; braces holding anything else ("\boxed{}", "\frac{a}{b}") stay as written.
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class Config(StepConfig):
    input: str = Field(description="Name of the step whose problems dataset (id, problem, answer) is sampled.")
    model: str = Field(description="Model to sample from: builtin:NAME, step:NAME, a local HF dir or a hub id.")
    n: int = Field(default=4, ge=1, description="Completions per problem.")
    temperature: float = Field(default=0.7, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens "
                                                              "whose probability reaches top_p.")
    top_k: int = Field(default=-1, ge=-1, description="Keep only the k most likely tokens; -1 keeps all.")
    max_tokens: int = Field(default=256, ge=1, description="Most new tokens per completion; longer ones stop "
                                                           "with finish_reason 'length'.")
    prompt_template: str = Field(
        default=DEFAULT_PROMPT_TEMPLATE,
        description="User message. {column} is replaced by that column of the row (at least {problem}); "
                    "other braces, such as \\boxed{}, are kept as written.")
    system_prompt: str | None = Field(
        default=None, description="System message sent before the user message; none if unset "
                                  "(the model's chat template may add its own default).")
    think_prefix: str = Field(
        default="", description="Text appended after the chat template's generation prompt, e.g. '<think>\\n' "
                                "for R1-style models. It is part of the prompt, not of the completion.")
    max_model_len: int | None = Field(
        default=None, ge=1, description="Longest prompt + completion in tokens; default: the model's own limit.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weights dtype in vLLM; auto lets vLLM choose (bfloat16 on CPU).")

    dry_run_overrides: ClassVar[dict] = {"n": 2, "max_tokens": 16}

    def model_refs(self) -> list[str]:
        return [self.model]

    @field_validator("prompt_template")
    @classmethod
    def _has_problem(cls, template: str) -> str:
        if "{problem}" not in template:
            raise ValueError(f"prompt_template must contain the {{problem}} placeholder: {template!r}")
        return template


def render_prompt(template: str, row: dict) -> str:
    """The template with each {column} placeholder filled from `row`."""
    return _PLACEHOLDER.sub(lambda m: str(row[m.group(1)]) if m.group(1) in row else m.group(0), template)


def chat_messages(cfg: Config, row: dict) -> list[dict]:
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return messages + [{"role": "user", "content": render_prompt(cfg.prompt_template, row)}]


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    from pipeline.generation import generate
    from pipeline.models import resolve_model

    problems = inputs[cfg.input].dataset()
    _check_columns(cfg, problems.column_names)
    model_dir = resolve_model(cfg.model, inputs)
    prompts = [chat_messages(cfg, row) for row in problems]

    started = time.perf_counter()
    generations = generate(
        model_dir, prompts, n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        max_tokens=cfg.max_tokens, seed=out.seed, max_model_len=cfg.max_model_len, dtype=cfg.dtype,
        think_prefix=cfg.think_prefix,
    )
    seconds = time.perf_counter() - started

    samples = problems.select([row for row in range(len(problems)) for _ in range(cfg.n)])
    completions = [c for per_problem in generations for c in per_problem]
    new_columns = {
        "sample_idx": [i for _ in range(len(problems)) for i in range(cfg.n)],
        "prompt": [p for p in prompts for _ in range(cfg.n)],
        "completion": [c.text for c in completions],
        "finish_reason": [c.finish_reason for c in completions],
        "prompt_tokens": [c.prompt_tokens for c in completions],
        "completion_tokens": [c.completion_tokens for c in completions],
        "model": [cfg.model] * len(completions),
    }
    for name, values in new_columns.items():
        samples = samples.add_column(name, values)

    finish_reasons = Counter(new_columns["finish_reason"])
    return out.write_dataset(
        samples,
        problems=len(problems),
        # each prompt once: the engine reads it once for all n samples
        prompt_tokens=sum(per_problem[0].prompt_tokens for per_problem in generations if per_problem),
        completion_tokens=generations.completion_tokens,
        **{f"finish_{reason}": count for reason, count in sorted(finish_reasons.items())},
        tokens_per_s=round(generations.tokens_per_second, 2),
        load_seconds=round(generations.load_seconds, 2),
        generate_seconds=round(generations.generate_seconds, 2),
        seconds=round(seconds, 2),
    )


def _check_columns(cfg: Config, columns: list[str]) -> None:
    if "problem" not in columns:
        raise UserError(f"sample: dataset {cfg.input!r} has no 'problem' column (columns: {columns})")
    clashes = [c for c in SAMPLE_COLUMNS if c in columns]
    if clashes:
        raise UserError(f"sample: dataset {cfg.input!r} already has column(s) {clashes}, which sampling writes; "
                        "drop or rename them in the load step")
