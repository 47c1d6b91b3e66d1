"""The settings every training step's `Config` has: `LoraSettings`, `TrackedConfig` (report_to, checked when
the recipe loads and before the step runs) and `TrainingConfig` (the model, LoRA, the schedule, checkpoints,
precision, launch).

Importing this module imports no torch, transformers, TRL or peft: the functions import what they need.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.core.compute_dtype import DtypeSetting
from pipeline.core.step import StepConfig
from pipeline.training.launch import accelerate_settings, join_launch, launch_machines, machine_placement
from pipeline.training.tracking import check_report_to, check_trackers_installed

# ---- settings ---------------------------------------------------------------------------------------------------


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=16, ge=1, description="LoRA rank.")
    alpha: int | None = Field(default=None, ge=1, description="LoRA alpha (scaling = alpha / r); default 2 * r.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: str | list[str] = Field(
        default="all-linear",
        description="Modules that get adapters: 'all-linear' (every linear layer but the output head) or a list of "
        "module names such as [q_proj, v_proj].",
    )


def no_adapter_on_the_head(lora: LoraSettings | None, step_type: str) -> LoraSettings | None:
    """Refuse LoRA on the output head for a step whose loss is computed in chunks from lm_head's own weight
    (pipeline.training.token_logprobs; it and TRL refuse such an adapter when the trainer is built): this names the
    usual way in, before anything runs."""
    if lora is not None:
        targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
        if "lm_head" in targets:
            raise ValueError(f"{step_type} cannot train an adapter on the output head: its loss is computed in chunks "
                             "from lm_head's own weight (pipeline.training.token_logprobs); leave lm_head out of "
                             "target_modules")
    return lora


class TrackedConfig(StepConfig):
    """A step that reports to experiment trackers (the training steps, evaluate): `report_to`, whose trackers are
    checked when the recipe loads and installed before the step runs. Each subclass says what it reports."""

    report_to: str | list[str] = Field(default="none", description="Experiment trackers: none, tensorboard, trackio, "
                                                                     "wandb, or a list.")

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, report_to: str | list[str]) -> str | list[str]:
        return check_report_to(report_to)

    def check_inputs(self) -> None:
        check_trackers_installed(self.report_to, self.uses)


class TrainingConfig(DtypeSetting, TrackedConfig):
    """Settings every training step (sft, redi, opsd, onpolicy) has: the model, LoRA, the schedule, checkpoints,
    precision, launch."""

    produces: ClassVar = "model"
    dry_run_overrides: ClassVar = {"max_steps": 2, "logging_steps": 1}
    path_fields: ClassVar = ("chat_template", "accelerate_config")
    libraries: ClassVar = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed")

    model: str = Field(description="Model to fine-tune: builtin:NAME, a local dir, a hub id, or step:NAME.")
    lora: LoraSettings | None = Field(
        default_factory=LoraSettings,
        description="LoRA settings; the step saves only the adapter. null: full fine-tuning, saves the whole model.",
    )
    epochs: float = Field(default=1.0, gt=0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps to train; overrides epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(default=8, ge=1, description="Sequences per device per forward pass.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Forward passes per optimizer step.")
    max_length: int = Field(
        default=1024, ge=8, description="Longest prompt + completion in tokens; longer rows are dropped, not cut."
    )
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="Fraction of steps of linear warmup.")
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = Field(default="linear", description="Learning-rate schedule after warmup (transformers' names).")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    logging_steps: int = Field(default=10, ge=1, description="Log the training loss every this many steps.")
    save_steps: int = Field(default=100, ge=1, description="Checkpoint every this many steps (for resume).")
    report_to: str | list[str] = Field(
        default="none", description="Experiment trackers for the training logs (loss, learning rate, ...): none, "
        "tensorboard (event files in the step's runs/), trackio (a local database, $TRACKIO_DIR), wandb, or a list. "
        "The run is named <recipe>/<step>."
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass: far less memory on long sequences, about a third slower.",
    )
    use_liger_kernel: bool = Field(
        default=False,
        description="Liger's Triton kernels in the model's layers (RMSNorm, RoPE, SwiGLU, ...): less activation memory "
        "and time on a CUDA GPU. Needs liger-kernel (the gpu extra). TRL deprecates it for Hub kernels.",
    )
    chat_template: str | None = Field(
        default=None,
        description="Train with this chat template instead of the model's own: a Jinja file, or a model dir whose "
        "tokenizer's template is taken. It is saved with the trained model, so sampling and evaluation use it too.",
    )
    num_processes: int = Field(
        default=1, ge=1, description="Processes (one per GPU) to train on, in total over all machines; above 1 the "
        "step runs under `accelerate launch`."
    )
    accelerate_config: str | None = Field(
        default=None,
        description="An accelerate config file, e.g. recipes/accelerate/zero3.yaml (DDP, DeepSpeed ZeRO-2/3, FSDP) or "
        "recipes/accelerate/zero3_multinode.yaml (several machines: each machine's rank and machine 0's address come "
        "from NODE_RANK and MASTER_ADDR); when set, the step runs under `accelerate launch --config_file` it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _bf16_is_now_dtype(cls, data):
        if isinstance(data, dict) and "bf16" in data:  # recipes written before `dtype` was every step's setting
            raise ValueError("bf16: replaced by `dtype: auto | bfloat16 | float16 | float32` (the autocast dtype; "
                             "auto picks bfloat16 where the hardware has it)")
        return data

    @field_validator("chat_template", "accelerate_config")
    @classmethod
    def _exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).exists():
            raise ValueError(f"file not found: {path} (relative paths are read from {Path.cwd()})")
        return path

    def check_inputs(self) -> None:
        super().check_inputs()
        machine_placement(self)  # refuses a multi-machine launch that lacks this machine's rank or machine 0's address

    def launch_machines(self) -> int:
        return launch_machines(self)

    def join_launch(self, inputs, out) -> None:
        from pipeline.core.step import step_module

        join_launch(self, inputs, out, step_module(self.uses).train)

    def model_refs(self) -> list[str]:
        return [self.model]

    def input_paths(self) -> list[str]:
        # An accelerate config may point at a DeepSpeed JSON (read from the working directory, as accelerate does).
        paths = [p for p in super().input_paths() if p]
        deepspeed = accelerate_settings(self).get("deepspeed_config")
        if isinstance(deepspeed, dict) and deepspeed.get("deepspeed_config_file"):
            paths.append(str(deepspeed["deepspeed_config_file"]))
        return paths
