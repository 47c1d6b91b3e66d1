"""What every training step (`sft`, `redi`, `opsd`, `onpolicy`) shares; each step module keeps only its own trainer.

Read top to bottom:

- the settings: `LoraSettings` and `TrainingConfig`, the fields every training step's `Config` has (the model, LoRA,
  the schedule, checkpoints, precision, launch);
- `train_here_or_launch`, every training step's `run`: the step's own `train(cfg, inputs, out)` in this process, or in
  `accelerate launch` processes (below) when the step asks for several;
- the pieces a step's `build_trainer` assembles its trainer from: `training_arguments` (the transformers
  TrainingArguments, autocast in the dtype `pipeline.compute_dtype` chooses), `load_tokenizer` (chat template, eos,
  and a pad token that is not eos: `use_distinct_pad_token`), `drop_overlong` (rows over max_length are dropped and counted, never cut) and
  `peft_config`;
- `train_and_save`: train, resuming from the last checkpoint in the step's scratch dir, then save the model, the
  tokenizer and the model card, and return the manifest stats;
- experiment tracking (`report_to`: TensorBoard, Trackio, W&B; `tracking_run` names the run) and
  `progress_callback`, which shows training on the step's progress row (`pipeline.console`);
- `model_card` (with `schedule_line`): the README saved with a trained model;
- several GPUs: `launch_distributed` writes the step's config, inputs and output dirs to a payload file and runs
  `python -m pipeline.training <payload>` under `accelerate launch` (`launch_command`); in each process
  `launched_main` runs the payload's step's `train`, and the main process writes the stats read back;
- several machines: an accelerate config with `num_machines` above 1 takes each machine's rank and machine 0's
  address from the environment (`machine_placement`); machine 0's `distill run` runs the step as above, every other
  machine's joins the launch (`join_launch`) and writes nothing in the shared workdir.

Importing this module imports no torch, transformers, TRL or peft: the functions import what they need.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.compute_dtype import DtypeSetting
from pipeline.errors import UserError
from pipeline.steps import StepConfig

# Tokens that serve as padding when a tokenizer has none of its own, or pads with eos.
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>")
# Written by the main process of an `accelerate launch`ed step: the stats the parent puts in the manifest.
LAUNCH_RESULT = "launch_result.json"
# The trainer's log (loss and metrics per logging step), beside model/ in the step dir; `distill report` plots it.
LOG_HISTORY = "log_history.json"
TRACKERS = ("tensorboard", "trackio", "wandb")  # what `report_to` takes, besides none
# Set by the runner while a step runs: its run's name in experiment trackers, <recipe>/<step> (<recipe>/seed-N/<step>
# under `distill run --seeds`). In the environment, `accelerate launch`ed processes see it too.
RUN_NAME_ENV = "DISTILL_RUN_NAME"
TENSORBOARD_DIR = "runs"  # TensorBoard's event files, in the step's dir


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

    def model_refs(self) -> list[str]:
        return [self.model]

    def input_paths(self) -> list[str]:
        # An accelerate config may point at a DeepSpeed JSON (read from the working directory, as accelerate does).
        paths = [p for p in super().input_paths() if p]
        deepspeed = accelerate_settings(self).get("deepspeed_config")
        if isinstance(deepspeed, dict) and deepspeed.get("deepspeed_config_file"):
            paths.append(str(deepspeed["deepspeed_config_file"]))
        return paths


# ---- a training step's `run` ------------------------------------------------------------------------------------


def train_here_or_launch(cfg: TrainingConfig, inputs, out):
    """A training step's `run`: its `train` in this process, or in `accelerate launch` processes when the step
    asks for several (or names an accelerate config)."""
    from pipeline.console import environment
    from pipeline.steps import step_module

    project, _ = tracking_run(out)
    # transformers' TensorBoard and W&B callbacks read their dir and project from the environment
    with environment(TENSORBOARD_LOGGING_DIR=str(out.dir / TENSORBOARD_DIR),
                     WANDB_PROJECT=os.environ.get("WANDB_PROJECT", project)):
        if runs_distributed(cfg):
            return launch_distributed(cfg, inputs, out)
        return out.model_written(**step_module(cfg.uses).train(cfg, inputs, out))


# ---- building a trainer -----------------------------------------------------------------------------------------


def training_arguments(cfg: TrainingConfig, out) -> dict:
    """transformers TrainingArguments every training step passes to its TRL config."""
    import torch

    autocast = cfg.dtype_choice().dtype  # over float32 weights: bf16, fp16 (CUDA only) or none
    project, run_name = tracking_run(out)
    if cfg.use_liger_kernel:
        from transformers.utils import is_liger_kernel_available

        if not is_liger_kernel_available():
            raise UserError(f"{cfg.uses}: use_liger_kernel needs the liger-kernel package (the gpu extra, on a CUDA "
                            "machine); install it or set use_liger_kernel: false")
    return dict(
        output_dir=str(out.scratch / "checkpoints"),
        seed=out.seed,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to=cfg.report_to,
        project=project,  # Trackio's
        run_name=run_name,
        disable_tqdm=True,  # the step's progress row shows training (`progress_callback`); the logs go to its log file
        bf16=autocast == "bfloat16",
        fp16=autocast == "float16",
        gradient_checkpointing=cfg.gradient_checkpointing,
        use_liger_kernel=cfg.use_liger_kernel,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 without CUDA unless told it is CPU
        include_num_input_tokens_seen="non_padding",
    )


def load_tokenizer(cfg: TrainingConfig, model_path: str):
    """The model's tokenizer with the chat template to train with, an eos, and a pad token that is not eos."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if cfg.chat_template:
        template = Path(cfg.chat_template)
        tokenizer.chat_template = (
            AutoTokenizer.from_pretrained(str(template)).chat_template if template.is_dir() else template.read_text()
        )
    if not tokenizer.chat_template:
        raise UserError(f"{cfg.uses}: model {cfg.model!r} has no chat template; name one with `chat_template`")
    if tokenizer.eos_token_id is None:
        raise UserError(f"{cfg.uses}: the tokenizer of model {cfg.model!r} has no eos token, so it cannot learn to stop")
    use_distinct_pad_token(tokenizer)
    return tokenizer


def use_distinct_pad_token(tokenizer) -> None:
    """Pad with a token other than eos, so no padding rule can ever mask the eos a completion ends with."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.unk_token, *PAD_CANDIDATES):
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    # No spare token: TRL pads labels with -100 independently of the pad token, and the training steps' eos checks
    # (sft: eos in every row's labels; redi: in both completions of every pair) still guarantee every trained row ends
    # with eos.
    tokenizer.pad_token = tokenizer.eos_token


def drop_overlong(dataset, tokenizer, cfg: TrainingConfig, completion_columns: tuple[str, ...], dataset_name: str):
    """Rows whose prompt + each completion fit in max_length tokens; a cut completion would lose its eos."""

    def fits(row) -> bool:
        return all(
            len(tokenizer.apply_chat_template(row["prompt"] + row[column], tokenize=True, return_dict=True)["input_ids"])
            <= cfg.max_length
            for column in completion_columns
        )

    kept = dataset.filter(fits, keep_in_memory=True, desc=f"{cfg.uses}: dropping rows over max_length")
    if len(kept) == 0:
        raise UserError(
            f"{cfg.uses}: every row of dataset {dataset_name!r} is longer than max_length={cfg.max_length} tokens "
            "(prompt + completion); raise max_length"
        )
    return kept


def peft_config(lora: LoraSettings | None):
    if lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha or 2 * lora.r,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


# ---- training and saving ----------------------------------------------------------------------------------------


def train_and_save(trainer, cfg: TrainingConfig, out, card: str, *, chat_template: str | None = None, **stats) -> dict:
    """Train (resuming from the last checkpoint in scratch), save model + tokenizer + card, return manifest stats.

    `chat_template`: the template to save with the model when training rendered prompts with another (the on-policy
    steps append the think prefix to the generation prompt for their rollouts; the model keeps its own template)."""
    from transformers.trainer_utils import get_last_checkpoint

    from pipeline.console import progress

    checkpoints = Path(trainer.args.output_dir)
    last_checkpoint = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    started = time.time()
    with progress("training", unit="steps") as bar:
        trainer.add_callback(progress_callback()(bar))
        trainer.train(resume_from_checkpoint=last_checkpoint)
    seconds = time.time() - started

    trainer.save_model(str(out.model_dir))  # every rank takes part (ZeRO-3 gathers); the main process writes
    if trainer.is_world_process_zero():
        if chat_template is not None:
            trainer.processing_class.chat_template = chat_template
        trainer.processing_class.save_pretrained(str(out.model_dir))
        (out.model_dir / "README.md").write_text(card)
        (out.dir / LOG_HISTORY).write_text(json.dumps(trainer.state.log_history))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens_this_run = trainer.state.num_input_tokens_seen - trainer._initial_num_input_tokens_seen
    return dict(
        adapter=cfg.lora is not None,
        base_model=cfg.model,
        **stats,
        steps=trainer.state.global_step,
        resumed_from_step=int(last_checkpoint.rsplit("-", 1)[1]) if last_checkpoint else 0,
        train_loss_first=losses[0] if losses else None,
        train_loss_last=losses[-1] if losses else None,
        tokens_seen=trainer.state.num_input_tokens_seen,
        train_seconds=round(seconds, 2),
        tokens_per_second=round(tokens_this_run / seconds, 1) if seconds else None,
        autocast="bfloat16" if trainer.args.bf16 else "float16" if trainer.args.fp16 else None,
        processes=trainer.args.world_size,
    )


# ---- experiment tracking and the progress row -------------------------------------------------------------------


def check_report_to(report_to: str | list[str]) -> str | list[str]:
    """`report_to` as given, if it names known trackers (a recipe error otherwise)."""
    names = [report_to] if isinstance(report_to, str) else report_to
    unknown = [name for name in names if name not in (*TRACKERS, "none")]
    if unknown:
        raise ValueError(f"unknown tracker(s) {', '.join(map(repr, unknown))}; report_to takes "
                         f"{', '.join(TRACKERS)}, a list of them, or none")
    if "none" in names and len(names) > 1:
        raise ValueError(f"report_to lists none with trackers: {names}")
    return report_to


def trackers(report_to: str | list[str]) -> list[str]:
    return [name for name in ([report_to] if isinstance(report_to, str) else report_to) if name != "none"]


def check_trackers_installed(report_to: str | list[str], step: str) -> None:
    import importlib.util

    for name in trackers(report_to):
        if importlib.util.find_spec(name) is None:
            raise UserError(f"{step}: report_to {name} needs the {name} package, which is not installed "
                            f"(pip install {name}, or remove it from report_to)")


def tracking_run(out) -> tuple[str, str]:
    """The project and the name of a step's run in experiment trackers: the recipe and <recipe>/<step> under `distill
    run` (RUN_NAME_ENV); elsewhere distillery and the step's name."""
    run_name = os.environ.get(RUN_NAME_ENV) or out.name
    return (run_name.split("/")[0] if "/" in run_name else "distillery"), run_name


@functools.cache
def progress_callback():
    """The TrainerCallback class below; built on first use, so importing this module never imports transformers."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Optimizer steps done of max_steps, and the last logged loss, on a progress row (`pipeline.console`)."""

        def __init__(self, bar):
            self.bar = bar

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # resumed: global_step is the checkpoint's
                self.bar.update(total=state.max_steps, completed=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar.update(completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                self.bar.update(note=f"loss {logs['loss']:.4g}")

    return ProgressCallback


# ---- the model card ---------------------------------------------------------------------------------------------


def model_card(cfg: TrainingConfig, step_name: str, *, facts: Iterable[str], trained: str = "trained by",
               kind: str | None = None, batch_unit: str = "") -> str:
    """The README saved with a trained model: a title, one sentence on what the model is and how which step made it,
    a line per fact (its base model, data, teacher, ...), and a line on the schedule.

    The sentence reads `{kind} {trained} the distillery `{cfg.uses}` step `{step_name}`.`: `kind` defaults to the
    LoRA adapter or full model that `cfg.lora` asks for; `trained` names the method where the step type alone does
    not ("trained by on-policy distillation in"). `batch_unit` says what the batch size counts (" pairs").
    """
    if kind is None:
        kind = f"LoRA adapter (r={cfg.lora.r})" if cfg.lora else "Fully fine-tuned model"
    lines = "".join(f"- {fact}\n" for fact in facts)
    return (f"# {step_name}\n\n{kind} {trained} the distillery `{cfg.uses}` step `{step_name}`.\n\n{lines}"
            + schedule_line(cfg, batch_unit))


def schedule_line(cfg: TrainingConfig, batch_unit: str = "") -> str:
    """The model card's line on how long and how fast a training step trained."""
    return (f"- {cfg.epochs} epochs" + (f", max {cfg.max_steps} steps" if cfg.max_steps else "")
            + f", learning rate {cfg.learning_rate}, batch {cfg.batch_size}{batch_unit} x "
            f"{cfg.gradient_accumulation_steps}\n")


# ---- several GPUs: the step re-runs itself under `accelerate launch` --------------------------------------------

# A multi-machine accelerate config (num_machines above 1) names no host and no rank: each machine's `distill run`
# takes them from the variables its launcher sets (torchrun's names first, then Slurm's), so the step's key (which
# fingerprints the config file) is the same on every machine and stays so when the job moves to other hosts.
MACHINE_RANK_ENV = ("NODE_RANK", "SLURM_NODEID")  # this machine's rank: 0 on machine 0
MACHINES_ENV = ("NNODES", "SLURM_NNODES")  # machines taking part; unset: the config file's num_machines
MAIN_ADDRESS_ENV = "MASTER_ADDR"  # machine 0's address; unset: the config file's main_process_ip
MAIN_PORT_ENV = "MASTER_PORT"  # the port on machine 0; unset: the config file's main_process_port, else 29500


class MachinePlacement(NamedTuple):
    """This machine's place in a multi-machine launch: accelerate's --num_machines, --machine_rank,
    --main_process_ip and --main_process_port."""

    machines: int
    rank: int
    main_address: str
    main_port: int | None  # None: the config file's main_process_port, else accelerate's default


def runs_distributed(cfg: TrainingConfig) -> bool:
    return cfg.num_processes > 1 or cfg.accelerate_config is not None


def accelerate_settings(cfg: TrainingConfig) -> dict:
    """The step's accelerate config file, read as `accelerate launch` reads it (YAML or JSON); {} without one."""
    if not cfg.accelerate_config:
        return {}
    from pipeline import strict_yaml

    settings = strict_yaml.load_file(cfg.accelerate_config, "accelerate_config") or {}
    if not isinstance(settings, dict):
        raise UserError(f"accelerate_config {cfg.accelerate_config}: not a mapping of accelerate settings")
    return settings


def trains_across_machines(cfg: TrainingConfig) -> bool:
    """Whether the step's accelerate config asks for several machines (num_machines above 1)."""
    machines = accelerate_settings(cfg).get("num_machines") or 1
    if isinstance(machines, bool) or not isinstance(machines, int):
        raise UserError(f"accelerate_config {cfg.accelerate_config}: num_machines must be a whole number, got "
                        f"{machines!r}")
    return machines > 1


def machine_rank_from_environment(where: str = "multi-machine training") -> int | None:
    """This machine's rank as its launcher set it (NODE_RANK, else SLURM_NODEID); None where neither is set."""
    return _environment_int(MACHINE_RANK_ENV, where)


def machine_placement(cfg: TrainingConfig) -> MachinePlacement | None:
    """This machine's place in the step's launch when its accelerate config trains across machines (None when it
    does not); a recipe error when the environment lacks this machine's rank or machine 0's address."""
    settings = accelerate_settings(cfg)
    if not trains_across_machines(cfg):
        return None
    where = (f"{cfg.uses}: accelerate_config {cfg.accelerate_config} trains across machines "
             f"(num_machines: {settings['num_machines']})")
    machines = _environment_int(MACHINES_ENV, where) or int(settings["num_machines"])
    rank = machine_rank_from_environment(where)
    if rank is None:
        raise UserError(f"{where}, and this machine's rank is not set: set {MACHINE_RANK_ENV[0]} (0 on machine 0, "
                        f"1..{machines - 1} on the others), or run under Slurm's srun, which sets "
                        f"{MACHINE_RANK_ENV[1]}")
    if not 0 <= rank < machines:
        raise UserError(f"{where}: machine rank {rank} (from {_set_name(MACHINE_RANK_ENV)}) is not in "
                        f"0..{machines - 1}")
    main_address = os.environ.get(MAIN_ADDRESS_ENV) or settings.get("main_process_ip")
    if not main_address:
        raise UserError(f"{where}, and machine 0's address is not set: set {MAIN_ADDRESS_ENV} to the address of the "
                        "machine of rank 0 (the same on every machine)")
    total = cfg.num_processes if cfg.num_processes > 1 else int(settings.get("num_processes") or 1)
    if total % machines:
        raise UserError(f"{where}: num_processes {total} (the recipe's, else the file's) counts the processes of all "
                        f"machines together, as accelerate does, so it must be a multiple of the {machines} machines")
    deepspeed = settings.get("deepspeed_config") or {}
    if settings.get("distributed_type") == "DEEPSPEED" and deepspeed.get("deepspeed_multinode_launcher") != "standard":
        raise UserError(f"{where}: set deepspeed_config.deepspeed_multinode_launcher: standard in it; every machine "
                        "starts its own processes (`distill run` on each), none are started over ssh (pdsh)")
    return MachinePlacement(machines, rank, str(main_address), _environment_int((MAIN_PORT_ENV,), where))


def _environment_int(names: tuple[str, ...], where: str) -> int | None:
    """The first of these environment variables that is set, as an integer; None when none is."""
    name = _set_name(names)
    if name is None:
        return None
    try:
        return int(os.environ[name])
    except ValueError:
        raise UserError(f"{where}: environment variable {name}={os.environ[name]!r} is not an integer") from None


def _set_name(names: tuple[str, ...]) -> str | None:
    return next((name for name in names if os.environ.get(name)), None)


def launch_command(cfg: TrainingConfig, payload: Path) -> list[str]:
    """`accelerate launch` of this module's `launched_main` on the payload (which names the step type)."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config:
        command += ["--config_file", str(Path(cfg.accelerate_config).resolve())]
    if cfg.num_processes > 1 or not cfg.accelerate_config:
        command += ["--num_processes", str(cfg.num_processes)]
    placement = machine_placement(cfg)
    if placement is not None:
        command += ["--num_machines", str(placement.machines), "--machine_rank", str(placement.rank),
                    "--main_process_ip", placement.main_address]
        if placement.main_port is not None:
            command += ["--main_process_port", str(placement.main_port)]
    return command + ["-m", "pipeline.training", str(payload)]


def launch_payload(cfg: TrainingConfig, inputs, out) -> dict:
    """What each launched process needs to run the step's `train`: its config, its inputs and its output dirs."""
    return {
        "uses": cfg.uses,
        "config": cfg.model_dump(mode="json"),
        "inputs": {name: {"name": a.name, "kind": a.kind, "path": str(a.path), "key": a.key, "stats": a.stats}
                   for name, a in inputs.items()},
        "out": {"name": out.name, "kind": out.kind, "dir": str(out.dir), "scratch": str(out.scratch),
                "seed": out.seed, "dry_run": out.dry_run},
    }


def launch_distributed(cfg: TrainingConfig, inputs, out):
    """Run this step's `train` in `accelerate launch` processes, with the same output and scratch dirs.

    Every process trains; only the main one (of machine 0) writes the model and the stats file read back here.
    """
    payload = out.scratch / "launch.json"
    payload.write_text(json.dumps(launch_payload(cfg, inputs, out)))
    result = out.scratch / LAUNCH_RESULT
    result.unlink(missing_ok=True)
    command = _launch(cfg, payload)
    if not result.exists():
        raise RuntimeError(f"{cfg.uses}: `{' '.join(command)}` ended without its main process writing {result}; "
                           "its output is above")
    return out.model_written(**json.loads(result.read_text()))


def join_launch(cfg: TrainingConfig, inputs, out) -> None:
    """On a machine other than machine 0: this machine's processes of the step's launch, until training ends.

    The step's dirs (`out`) are machine 0's: its `distill run` clears them before launching and publishes them after,
    and only its main process writes there, so this machine's payload goes to a local temporary dir."""
    with tempfile.TemporaryDirectory(prefix="distill-launch-") as local:
        payload = Path(local) / "launch.json"
        payload.write_text(json.dumps(launch_payload(cfg, inputs, out)))
        _launch(cfg, payload)


def _launch(cfg: TrainingConfig, payload: Path) -> list[str]:
    """Run `accelerate launch` on the payload (its output goes where this process's does); the command run."""
    command = launch_command(cfg, payload)
    process = subprocess.run(command)
    if process.returncode != 0:
        raise RuntimeError(f"{cfg.uses}: `{' '.join(command)}` failed (exit code {process.returncode}); "
                           "its output is above")
    return command


def launched_main(payload_path: str) -> None:
    """Entry point of each `accelerate launch`ed process: run the payload's training step's `train`."""
    from accelerate import PartialState

    from pipeline.artifacts import Artifact, Output
    from pipeline.steps import step_module

    import datasets

    # As in the runner: `.map()` on a loaded dataset would write cache files into the input step's dir (shared by
    # every process, of every machine).
    datasets.disable_caching()
    payload = json.loads(Path(payload_path).read_text())
    module = step_module(payload["uses"])
    cfg = module.Config(**payload["config"])
    inputs = {name: Artifact(**{**fields, "path": Path(fields["path"])}) for name, fields in payload["inputs"].items()}
    out_fields = payload["out"]
    out = Output(**{**out_fields, "dir": Path(out_fields["dir"]), "scratch": Path(out_fields["scratch"])})
    stats = module.train(cfg, inputs, out)
    if PartialState().is_main_process:
        (out.scratch / LAUNCH_RESULT).write_text(json.dumps(stats))


if __name__ == "__main__":
    launched_main(sys.argv[1])
