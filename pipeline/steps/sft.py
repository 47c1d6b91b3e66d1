"""`sft`: supervised fine-tuning on the selected traces, with TRL's SFTTrainer and (by default) a peft LoRA.

The input is TRL conversational data (`messages`, from `select`). Each row is split into a prompt (every
message but the last) and a completion (the final assistant message), so TRL computes the loss on the
completion only, which works with any chat template (`assistant_only_loss` needs `{% generation %}` markers
that most templates, SmolLM2's included, lack).

The model must learn to stop, so every trained row must have the end-of-sequence token in its labels: rows that
`max_length` truncated before it are dropped and counted (`dropped_truncated`), and the pad token is kept
distinct from eos. Checkpoints go to the step's scratch dir; a killed step resumes from the last one.

Output: with LoRA, the adapter (peft dir) + tokenizer, stats `adapter: true` and `base_model`; a `merge` step
turns it into a standalone model. With `lora: null`, the full fine-tuned model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import UserError
from pipeline.steps import StepConfig

# Tokens that serve as padding when a tokenizer has none of its own, or pads with eos.
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


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


class Config(StepConfig):
    produces: ClassVar = "model"
    dry_run_overrides: ClassVar = {"max_steps": 2, "logging_steps": 1}

    input: str = Field(description="Name of the step whose dataset (id, messages) is trained on, e.g. a select step.")
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
        default="none", description="Trackers for the Trainer logs: none, tensorboard, wandb, ... (transformers)."
    )

    def model_refs(self) -> list[str]:
        return [self.model]


def run(cfg: Config, inputs, out):
    from transformers.trainer_utils import get_last_checkpoint

    trainer, dropped_truncated = build_trainer(cfg, inputs, out)
    checkpoints = Path(trainer.args.output_dir)
    last_checkpoint = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    started = time.time()
    trainer.train(resume_from_checkpoint=last_checkpoint)
    seconds = time.time() - started

    trainer.save_model(str(out.model_dir))  # LoRA: the adapter only; full: the whole model
    trainer.processing_class.save_pretrained(str(out.model_dir))
    (out.model_dir / "README.md").write_text(model_card(cfg, out.name))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens_this_run = trainer.state.num_input_tokens_seen - trainer._initial_num_input_tokens_seen
    return out.model_written(
        adapter=cfg.lora is not None,
        base_model=cfg.model,
        rows=len(trainer.train_dataset),
        dropped_truncated=dropped_truncated,
        steps=trainer.state.global_step,
        resumed_from_step=int(last_checkpoint.rsplit("-", 1)[1]) if last_checkpoint else 0,
        train_loss_first=losses[0] if losses else None,
        train_loss_last=losses[-1] if losses else None,
        tokens_seen=trainer.state.num_input_tokens_seen,
        train_seconds=round(seconds, 2),
        tokens_per_second=round(tokens_this_run / seconds, 1),
        bf16=trainer.args.bf16,
    )


def build_trainer(cfg: Config, inputs, out):
    """An SFTTrainer over the prepared data, and how many rows it dropped for losing their eos to truncation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from pipeline.models import resolve_model

    set_seed(out.seed)  # before the model exists: LoRA's initial weights come from it
    train_data = prompt_completion_dataset(inputs[cfg.input].dataset(), cfg.input)
    model_path = resolve_model(cfg.model, inputs)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.eos_token_id is None:
        raise UserError(f"sft: the tokenizer of model {cfg.model!r} has no eos token, so the model cannot learn to stop")
    use_distinct_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    args = SFTConfig(
        output_dir=str(out.scratch / "checkpoints"),
        seed=out.seed,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to=cfg.report_to,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        dataloader_pin_memory=torch.cuda.is_available(),
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_data, processing_class=tokenizer, peft_config=peft_config(cfg.lora)
    )
    rows_prepared = len(trainer.train_dataset)
    eos_id = tokenizer.eos_token_id
    trainer.train_dataset = trainer.train_dataset.filter(lambda row: eos_id in row["labels"])
    if len(trainer.train_dataset) == 0:
        raise UserError(
            f"sft: no row of dataset {cfg.input!r} has the eos token {tokenizer.eos_token!r} in its trained tokens "
            f"after truncation to max_length={cfg.max_length}; raise max_length, or check that the chat template of "
            f"{cfg.model!r} ends an assistant turn with eos"
        )
    return trainer, rows_prepared - len(trainer.train_dataset)


def model_card(cfg: Config, step_name: str) -> str:
    kind = f"LoRA adapter (r={cfg.lora.r})" if cfg.lora else "Fully fine-tuned model"
    return (
        f"# {step_name}\n\n{kind} trained by the distillery `sft` step `{step_name}`.\n\n"
        f"- base model: `{cfg.model}`\n- training data: step `{cfg.input}`\n"
        f"- {cfg.epochs} epochs" + (f", max {cfg.max_steps} steps" if cfg.max_steps else "")
        + f", learning rate {cfg.learning_rate}, batch {cfg.batch_size} x {cfg.gradient_accumulation_steps}\n"
    )


def prompt_completion_dataset(dataset, dataset_name: str):
    """TRL conversational prompt-completion rows from `messages` rows: the last (assistant) message is the completion."""
    if "messages" not in dataset.column_names:
        raise UserError(
            f"sft: dataset of step {dataset_name!r} lacks column 'messages' (it has {', '.join(dataset.column_names)}); "
            "sft reads TRL conversational data such as a select step writes"
        )
    if len(dataset) == 0:
        raise UserError(f"sft: dataset of step {dataset_name!r} has no rows to train on")

    def split(row, index):
        messages = row["messages"]
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            row_id = row.get("id", f"row {index}")
            raise UserError(
                f"sft: {row_id!r} of dataset {dataset_name!r} does not end with an assistant message after a prompt"
            )
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    # In memory: otherwise this map and TRL's would write cache files into the input step's finished data dir.
    return dataset.map(split, with_indices=True, remove_columns=dataset.column_names, keep_in_memory=True)


def use_distinct_pad_token(tokenizer) -> None:
    """Pad with a token other than eos, so no padding rule can ever mask the eos a completion ends with."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.unk_token, *PAD_CANDIDATES):
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    # No spare token: TRL pads labels with -100 independently of the pad token, and build_trainer's
    # eos-in-labels filter still guarantees every trained row ends with eos.
    tokenizer.pad_token = tokenizer.eos_token


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
