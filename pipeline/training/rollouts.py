"""What the on-policy steps (opsd, onpolicy) share: the rollout settings (`RolloutConfig`), the TRL arguments made
from them, the think prefix in the trainer's prompts, and the model card's line on the rollouts.

Imports no torch: the steps' configs build on `RolloutConfig` when a recipe is only validated.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.engines.settings import SamplingFields
from pipeline.text.prompts import DEFAULT_PROMPT_TEMPLATE
from pipeline.training.build import training_arguments
from pipeline.training.config import TrainingConfig


class RolloutConfig(TrainingConfig, SamplingFields):
    """Settings of the on-policy steps (opsd, onpolicy): the student's rollouts and where they are sampled. The
    sampling settings are `SamplingFields`' (max_tokens, temperature, top_p, top_k, think_prefix), temperature and
    top_k as the rollouts take them."""

    dry_run_overrides: ClassVar = {"max_steps": 2, "logging_steps": 1, "max_tokens": 8}
    libraries: ClassVar = TrainingConfig.libraries + ("vllm",)  # rollouts with use_vllm

    temperature: float = Field(default=1.0, gt=0, description="Rollout sampling temperature; the divergence is "
                                                              "computed on logits divided by it too (TRL).")
    top_k: int = Field(default=0, ge=0, description="Rollouts sample from the k most likely tokens; 0 keeps all.")
    prompt_template: str = Field(
        default=DEFAULT_PROMPT_TEMPLATE,
        description="Student prompt (user message) for problems rows: {column} is replaced by that column "
                    "(at least {problem}); other braces, such as \\boxed{}, are kept.")
    use_vllm: bool = Field(default=False, description="Sample rollouts with vLLM (TRL; GPUs) instead of HF generate.")
    vllm_mode: Literal["colocate", "server"] = Field(
        default="colocate", description="use_vllm: colocate (in the training process) or server (`trl vllm-serve`).")
    vllm_gpu_memory_utilization: float = Field(default=0.3, gt=0, le=1,
                                               description="use_vllm colocate: GPU memory share of the engine.")

    @model_validator(mode="after")
    def _budget_fits(self):
        if self.max_tokens >= self.max_length:
            raise ValueError(f"max_tokens ({self.max_tokens}) leaves no room for a prompt in max_length "
                             f"({self.max_length})")
        return self


def rollout_arguments(cfg: RolloutConfig, out) -> dict:
    """The Trainer and rollout arguments of every on-policy TRL config (SDFTConfig, DistillationConfig, GOLDConfig)."""
    return dict(
        # Rollout batches are built by TRL, which the Trainer cannot count tokens of; the trainers count them.
        **{**training_arguments(cfg, out), "include_num_input_tokens_seen": "no"},
        max_completion_length=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        use_vllm=cfg.use_vllm,
        vllm_mode=cfg.vllm_mode,
        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        vllm_max_model_length=cfg.max_length,
    )


def rollouts_fact(cfg: RolloutConfig) -> str:
    """The model card's line on how an on-policy step sampled its rollouts."""
    return f"rollouts: {cfg.max_tokens} tokens, temperature {cfg.temperature}, top_p {cfg.top_p}, top_k {cfg.top_k}"


def prompt_with_think_prefix(tokenizer, cfg: RolloutConfig) -> tuple[str, str]:
    """Make the trainer's own prompt rendering (TRL renders rollout prompts itself) end with the think prefix that
    `sample` and `evaluate` would append for this model; returns (the prefix, the model's template to save)."""
    from pipeline.text.chat import template_appending, think_prefix

    own_template = tokenizer.chat_template
    think = think_prefix(tokenizer, cfg.think_prefix)
    if think.appended:
        tokenizer.chat_template = template_appending(own_template, think.appended)
    return think.appended, own_template
