"""The pieces a training step's trainer is built from, and training and saving it:

- `training_arguments` (the transformers TrainingArguments, autocast in the dtype `pipeline.core.compute_dtype`
  chooses), `load_tokenizer` (chat template, eos, and a pad token that is not eos: `use_distinct_pad_token`),
  `drop_overlong` (rows over max_length are dropped and counted, never cut) and `peft_config`;
- `train_and_save`: train, resuming from the last checkpoint in the step's scratch dir, then save the model, the
  tokenizer and the model card, and return the manifest stats;
- `model_card` (with `schedule_line`): the README saved with a trained model (its body: pipeline.core.cards, where
  the runner adds the front matter and lineage every card shares).

Importing this module imports no torch, transformers, TRL or peft: the functions import what they need.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from pipeline.core.cards import model_card_body
from pipeline.core.errors import UserError
from pipeline.training.config import LoraSettings, TrainingConfig
from pipeline.training.tracking import LOG_HISTORY, progress_callback, tracking_run

# Tokens that serve as padding when a tokenizer has none of its own, or pads with eos.
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


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

    from pipeline.core.console import progress

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
    schedule = schedule_line(cfg, batch_unit)[len("- "):-len("\n")]
    return model_card_body(step_name, f"{kind} {trained} the distillery `{cfg.uses}` step `{step_name}`.",
                           [*facts, schedule])


def schedule_line(cfg: TrainingConfig, batch_unit: str = "") -> str:
    """The model card's line on how long and how fast a training step trained."""
    return (f"- {cfg.epochs} epochs" + (f", max {cfg.max_steps} steps" if cfg.max_steps else "")
            + f", learning rate {cfg.learning_rate}, batch {cfg.batch_size}{batch_unit} x "
            f"{cfg.gradient_accumulation_steps}\n")
