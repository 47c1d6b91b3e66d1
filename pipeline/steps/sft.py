"""`sft`: supervised fine-tuning on the selected traces, with TRL's SFTTrainer and (by default) a peft LoRA.

The input is TRL conversational data (`messages`, from `select`). Each row is split into a prompt (every
message but the last) and a completion (the final assistant message), so TRL computes the loss on the
completion only, which works with any chat template (`assistant_only_loss` needs `{% generation %}` markers
that most templates, SmolLM2's included, lack).

The model must learn to stop, so every trained row must have the end-of-sequence token in its labels: rows longer
than `max_length` are dropped before tokenization and counted (`dropped_truncated`), never cut; the pad token is kept
distinct from eos; a batch without a single trained token stops the run instead of adding a silent zero loss.
Checkpoints go to the step's scratch dir; a killed step resumes from the last one.

Before the model is loaded, every row goes through `pipeline.training.template_check` with the tokenizer and chat template the
trainer uses (think spans kept, the loss mask exactly the completion and its end of turn, the prompt the one the model
generates from); a row that would train wrongly stops the step with exit code 2, naming it.

What every training step shares (`TrainingConfig`, the Trainer arguments, resume and save, the model card, and the
`accelerate launch` path for several GPUs) is in `pipeline.training.launch`.

Output: with LoRA, the adapter (peft dir) + tokenizer, stats `adapter: true` and `base_model`; a `merge` step
turns it into a standalone model. With `lora: null`, the full fine-tuned model.
"""

from __future__ import annotations

from pydantic import Field

from pipeline.core.errors import UserError
from pipeline.core.step import require_columns
from pipeline.training.build import (
    drop_overlong,
    load_tokenizer,
    model_card,
    peft_config,
    train_and_save,
    training_arguments,
)
from pipeline.training.config import TrainingConfig
from pipeline.training.launch import train_here_or_launch


class Config(TrainingConfig):
    input: str = Field(description="Name of the step whose dataset (id, messages) is trained on, e.g. a select step.")
    packing: bool = Field(
        default=False,
        description="Pack several rows into each max_length sequence (TRL best-fit decreasing, no row is cut); "
        "attention stays within each row (padding-free).",
    )
    padding_free: bool = Field(
        default=False,
        description="Concatenate a batch's rows into one sequence without padding (position ids keep rows apart). "
        "Fastest with flash-attention on GPU.",
    )


def run(cfg: Config, inputs, out):
    return train_here_or_launch(cfg, inputs, out, train)


def train(cfg: Config, inputs, out) -> dict:
    """Train in this process (every process of a distributed launch runs it); returns the manifest stats."""
    trainer, data_stats = build_trainer(cfg, inputs, out)
    card = model_card(cfg, out.name, facts=[f"base model: `{cfg.model}`", f"training data: step `{cfg.input}`"])
    return train_and_save(trainer, cfg, out, card, **data_stats)


def build_trainer(cfg: Config, inputs, out):
    """An SFTTrainer over the prepared data, and the rows it trains on and dropped for being over max_length."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig

    from pipeline.core.models import resolve_model
    from pipeline.training.sft_trainer import CheckedSFTTrainer

    set_seed(out.seed)  # before the model exists: LoRA's initial weights come from it
    model_path = resolve_model(cfg.model, inputs)
    tokenizer = load_tokenizer(cfg, model_path)
    conversations = prompt_completion_dataset(inputs[cfg.input].dataset(), cfg.input)
    checked = template_check(cfg, inputs, tokenizer)
    train_data = drop_overlong(conversations, tokenizer, cfg, ("completion",), cfg.input)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    args = SFTConfig(
        **training_arguments(cfg, out),
        # Rows are already at most max_length; TRL refuses padding-free without packing when given one.
        max_length=None if cfg.padding_free and not cfg.packing else cfg.max_length,
        packing=cfg.packing,
        padding_free=cfg.padding_free,
        completion_only_loss=True,
    )
    trainer = CheckedSFTTrainer(
        model=model, args=args, train_dataset=train_data, processing_class=tokenizer, peft_config=peft_config(cfg.lora)
    )
    eos_id = tokenizer.eos_token_id
    missing_eos = sum(eos_id not in row["labels"] for row in trainer.train_dataset)
    if missing_eos:
        raise UserError(
            f"sft: {missing_eos} row(s) of dataset {cfg.input!r} have no eos token {tokenizer.eos_token!r} in their "
            f"trained tokens; check that the chat template of {cfg.model!r} ends an assistant turn with eos"
        )
    return trainer, {"rows": len(train_data), "dropped_truncated": len(conversations) - len(train_data), **checked}


def template_check(cfg: Config, inputs, tokenizer) -> dict:
    """Every row through the chat template as the trainer will tokenize it (`pipeline.training.template_check`)."""
    from pipeline.text.chat import think_prefix
    from pipeline.training.template_check import check_rows, training_rows

    return check_rows(tokenizer, training_rows(inputs[cfg.input].dataset()), step=cfg.uses, dataset=cfg.input,
                      think=think_prefix(tokenizer), model_ref=cfg.model)


def prompt_completion_dataset(dataset, dataset_name: str):
    """TRL conversational prompt-completion rows from `messages` rows: the last (assistant) message is the completion."""
    require_columns(dataset, ["messages"], step="sft", source=dataset_name,
                    reads="TRL conversational data such as a select step writes")
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
