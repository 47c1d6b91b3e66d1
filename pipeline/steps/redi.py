"""`redi`: Reinforcement Distillation (REDI, arXiv 2505.24850) on pairs of a correct and an incorrect trace.

The objective, exactly as the paper's Eq. 5 (`redi_loss` in `pipeline.training.redi_trainer`):

    L = mean over pairs of [ -log pi(y_w|x) / |y_w|  +  alpha * log pi(y_l|x) / |y_l| ]

where log pi(y|x) sums the completion's token log-probs and |y| is that completion's own token count (eos included,
prompt excluded). It is reference-free: no reference model is loaded and no reference forward ever runs.

Trained by `pipeline.training.redi_trainer.RediTrainer`: TRL's DPOTrainer (tokenization, the collator that scores
chosen and rejected in one forward pass, peft and DeepSpeed/FSDP) with this loss, no reference model, and the
completions' log-probs scored in chunks. Logged each logging step: `redi/chosen_norm`, `redi/rejected_norm` (mean
length-normalised log-probs) and `redi/margin` (their difference). Long traces: by default (`one_sequence_at_a_time`)
backward holds one sequence's activations instead of 2 x batch_size; `gradient_checkpointing` bounds them further
(see the trainer module and BENCHMARKS.md, "REDI on long pairs").

Input: TRL preference data, `id`, `prompt` (chat messages), `chosen` and `rejected` (one assistant message each), as
the `pairs` step writes. Pairs with a side longer than `max_length` are dropped and counted, never cut.

Model: usually `step:<sft step>`. When that is a LoRA adapter, the adapter is loaded onto its base model and trained
further (`lora` must then be unset); the output is again an adapter on the same base, which `merge` folds in. A full
model is trained in full (`lora: null`, the default) or gets a new adapter (`lora: {r: ...}`). An adapter on the
output head itself (lm_head in its target modules) is refused: the chunked log-probs use the head's own weight.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, field_validator

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
from pipeline.training.config import LoraSettings, TrainingConfig, no_adapter_on_the_head
from pipeline.training.launch import train_here_or_launch

PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected")


class Config(TrainingConfig):
    input: str = Field(description="Name of the step whose pairs (id, prompt, chosen, rejected) are trained on.")
    model: str = Field(description="Model to train, usually step:<sft step> (a LoRA adapter is trained further).")
    alpha: float = Field(
        default=0.8, ge=0.0,
        description="Weight of the rejected term. 0: length-normalised SFT on the chosen; 1: symmetric; paper: 0.8.",
    )
    lora: LoraSettings | None = Field(
        default=None,
        description="A new LoRA adapter on a full model. null: train a full model in full, or keep training the "
        "adapter when `model` is one.",
    )
    learning_rate: float = Field(default=1e-6, gt=0, description="Peak learning rate (paper: 1e-6, full fine-tuning).")
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0, description="Fraction of steps of linear warmup.")
    batch_size: int = Field(default=4, ge=1, description="Pairs per device per forward pass (2 sequences each).")
    one_sequence_at_a_time: bool = Field(
        default=True,
        description="Run each sequence of a batch (chosen and rejected of each pair) through the model on its own "
        "inside activation checkpointing: backward holds the layer activations of one sequence instead of "
        "2 x batch_size, for one more forward pass. false: one forward over the whole batch, as DPO does.",
    )

    @field_validator("lora")
    @classmethod
    def _no_adapter_on_the_head(cls, lora: LoraSettings | None) -> LoraSettings | None:
        return no_adapter_on_the_head(lora, "redi")


def run(cfg: Config, inputs, out):
    return train_here_or_launch(cfg, inputs, out, train)


def train(cfg: Config, inputs, out) -> dict:
    trainer, data_stats, lineage = build_trainer(cfg, inputs, out)
    if lineage.get("adapter_from"):
        kind = f"The LoRA adapter of `{lineage['adapter_from']}`, trained further"
    else:
        kind = f"A LoRA adapter (r={cfg.lora.r})" if cfg.lora else "A fully fine-tuned model"
    card = model_card(cfg, out.name, kind=kind, trained=f"with REDI (reference-free, alpha={cfg.alpha}) by",
                      facts=[f"base model: `{lineage['base_model']}`", f"started from: `{cfg.model}`",
                             f"pairs: step `{cfg.input}`"], batch_unit=" pairs")
    stats = train_and_save(trainer, cfg, out, card, alpha=cfg.alpha, **data_stats)
    # The adapter's own base, so `merge` and the lineage name the original model, not the sft step.
    return {**stats, "adapter": trainer.is_peft, "base_model": lineage["base_model"],
            "adapter_from": lineage.get("adapter_from")}


def build_trainer(cfg: Config, inputs, out):
    """A RediTrainer, the data stats (rows, dropped_truncated) and the lineage (base model, adapter it continues)."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed
    from trl import DPOConfig

    from pipeline.core.artifacts import Artifact
    from pipeline.core.models import resolve_model
    from pipeline.training.redi_trainer import RediTrainer

    set_seed(out.seed)
    model_path = resolve_model(cfg.model, inputs)
    tokenizer = load_tokenizer(cfg, model_path)
    pairs = preference_dataset(inputs[cfg.input].dataset(), cfg.input)
    checked = template_check(cfg, inputs, tokenizer)
    train_data = drop_overlong(pairs, tokenizer, cfg, ("chosen", "rejected"), cfg.input)

    adapter_dir = Path(model_path) if (Path(model_path) / "adapter_config.json").exists() else None
    # A model from a training step names the model it started from; that is the base of this one too.
    source = inputs.get(cfg.model.removeprefix("step:")) or Artifact(cfg.model, "model", Path(model_path).parent)
    lineage = {"base_model": source.stats.get("base_model") or cfg.model}
    if adapter_dir is not None:
        from peft import PeftConfig

        from pipeline.core.models import base_model_path

        if cfg.lora is not None:
            raise UserError(f"redi: model {cfg.model!r} is a LoRA adapter, which is trained further with its own "
                            "settings; remove `lora`, or merge the adapter first and give the merged model")
        base_path = base_model_path(json.loads((adapter_dir / "adapter_config.json").read_text()), source)
        lineage = {"base_model": source.stats.get("base_model") or base_path, "adapter_from": cfg.model}
        adapter = PeftConfig.from_pretrained(str(adapter_dir))
        adapter.inference_mode = False
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    else:
        adapter = peft_config(cfg.lora)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    args = DPOConfig(
        **training_arguments(cfg, out),
        max_length=cfg.max_length,
        # Full fine-tuning: keeps DPOTrainer from loading a reference model (RediTrainer's precompute is a no-op).
        precompute_ref_log_probs=adapter is None,
    )
    trainer = RediTrainer(model=model, args=args, train_dataset=train_data, processing_class=tokenizer,
                          peft_config=adapter, alpha=cfg.alpha, one_sequence_at_a_time=cfg.one_sequence_at_a_time)
    if adapter_dir is not None:
        load_adapter_weights(trainer.model, adapter_dir)

    eos_id = tokenizer.eos_token_id
    missing_eos = sum(eos_id not in row["chosen_ids"] or eos_id not in row["rejected_ids"]
                      for row in trainer.train_dataset)
    if missing_eos:
        raise UserError(f"redi: {missing_eos} pair(s) of dataset {cfg.input!r} have a completion without the eos token "
                        f"{tokenizer.eos_token!r}; check that the chat template ends an assistant turn with eos")
    return trainer, {"rows": len(train_data), "dropped_truncated": len(pairs) - len(train_data), **checked}, lineage


def template_check(cfg: Config, inputs, tokenizer) -> dict:
    """Both completions of every pair through the chat template as the trainer will tokenize them
    (`pipeline.training.template_check`)."""
    from pipeline.text.chat import think_prefix
    from pipeline.training.template_check import check_rows, training_rows

    return check_rows(tokenizer, training_rows(inputs[cfg.input].dataset(), ("chosen", "rejected")), step=cfg.uses,
                      dataset=cfg.input, think=think_prefix(tokenizer), model_ref=cfg.model)


def load_adapter_weights(model, adapter_dir: Path) -> None:
    """Copy a saved adapter's weights into the freshly initialised adapter of the same config."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(str(adapter_dir))
    result = set_peft_model_state_dict(model, weights)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        raise RuntimeError(f"redi: the adapter in {adapter_dir} does not fit its base model "
                           f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})")


def preference_dataset(dataset, dataset_name: str):
    """The pairs as TRL conversational preference rows, checked: a prompt and one assistant message per side."""
    require_columns(dataset, PAIR_COLUMNS, step="redi", source=dataset_name,
                    reads="TRL preference data such as a pairs step writes")
    if len(dataset) == 0:
        raise UserError(f"redi: dataset of step {dataset_name!r} has no pairs to train on")

    def check(row):
        for column in ("chosen", "rejected"):
            messages = row[column]
            if not isinstance(messages, list) or len(messages) != 1 or messages[0].get("role") != "assistant":
                raise UserError(f"redi: {row['id']!r} of dataset {dataset_name!r}: column {column!r} must be one "
                                f"assistant message ([{{role: assistant, content: ...}}])")
        if not isinstance(row["prompt"], list) or not row["prompt"]:
            raise UserError(f"redi: {row['id']!r} of dataset {dataset_name!r}: column 'prompt' must be chat messages")
        return {}

    # In memory: otherwise this map and TRL's would write cache files into the input step's finished data dir.
    return dataset.select_columns(list(PAIR_COLUMNS)).map(check, keep_in_memory=True)
