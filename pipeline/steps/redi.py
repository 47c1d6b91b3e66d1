"""`redi`: Reinforcement Distillation (REDI, arXiv 2505.24850) on pairs of a correct and an incorrect trace.

The objective, exactly as the paper's Eq. 5 (see `redi_loss`):

    L = mean over pairs of [ -log pi(y_w|x) / |y_w|  +  alpha * log pi(y_l|x) / |y_l| ]

where log pi(y|x) sums the completion's token log-probs and |y| is that completion's own token count (eos included,
prompt excluded). It is reference-free: no reference model is loaded and no reference forward ever runs.

Built on TRL's DPOTrainer, which gives the preference-data tokenization (chat template, prompt/completion split), the
collator that stacks [chosen; rejected] so both are scored in one forward pass, peft and DeepSpeed/FSDP handling.
`RediTrainer` replaces its loss: the policy's log-probs only. For a full fine-tune TRL would load a reference copy of
the model unless reference log-probs are "precomputed"; the step sets that flag and the trainer's precompute does
nothing (under FSDP, where TRL would still load the copy for that precompute, the load is replaced by none). Logged
each logging step: `redi/chosen_norm`, `redi/rejected_norm` (mean length-normalised log-probs) and `redi/margin`
(their difference).

Long traces: the completion tokens' log-probs come from `pipeline.training.token_logprobs`, which projects the final hidden
states onto the vocabulary `LOGPROB_CHUNK_SIZE` positions at a time and recomputes each chunk in backward, so no
full-vocabulary logits of the whole sequence ever exist, and prompt and padding positions are not projected at all.
TRL's fused LM head (what DPOTrainer uses) tiles too, but in 4,096-position x 32,768-entry tiles, scores every
position where Triton is missing, and there its torch fallback holds ~4 GiB of tile temporaries in backward. What
remains and grows with the length is the transformer's own activations. REDI's loss is a sum of per-sequence terms, so
by default (`one_sequence_at_a_time`) each sequence goes through the model on its own inside activation
checkpointing and backward holds one sequence's activations instead of 2 x batch_size (one more forward pass);
`gradient_checkpointing` bounds them further, to each layer's input (see BENCHMARKS.md, "REDI on long pairs").
`use_liger_kernel` swaps Liger's kernels into the layers only: DPOTrainer turns Liger's fused linear cross-entropy
off, and REDI's log-probs never go through the model's head module anyway.

Input: TRL preference data, `id`, `prompt` (chat messages), `chosen` and `rejected` (one assistant message each), as
the `pairs` step writes. Pairs with a side longer than `max_length` are dropped and counted, never cut.

Model: usually `step:<sft step>`. When that is a LoRA adapter, the adapter is loaded onto its base model and trained
further (`lora` must then be unset); the output is again an adapter on the same base, which `merge` folds in. A full
model is trained in full (`lora: null`, the default) or gets a new adapter (`lora: {r: ...}`). An adapter on the
output head itself (lm_head in its target modules) is refused: the chunked log-probs use the head's own weight.
"""

from __future__ import annotations

import functools
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
from pipeline.training.config import LoraSettings, TrainingConfig
from pipeline.training.launch import train_here_or_launch

PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected")
# Positions whose full-vocabulary logits exist at once (pipeline.training.token_logprobs): 192 MiB of float32 logits per copy
# at SmolLM2's 49,152 entries, a few copies at a time; more positions per chunk are fewer, larger matrix products.
LOGPROB_CHUNK_SIZE = 1024


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
        # TRL and pipeline.training.token_logprobs refuse any adapter on the head when the trainer is built; this names the
        # usual way in, before anything runs.
        if lora is not None:
            targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
            if "lm_head" in targets:
                raise ValueError("redi cannot train an adapter on the output head: its log-probs are computed in "
                                 "chunks from lm_head's own weight (pipeline.training.token_logprobs); leave lm_head out of "
                                 "target_modules")
        return lora


def redi_loss(chosen_logps, chosen_lengths, rejected_logps, rejected_lengths, alpha: float = 0.8):
    """REDI loss: mean over pairs of -chosen_logps/chosen_lengths + alpha * rejected_logps/rejected_lengths.

    `*_logps` are per-sequence SUMS of completion token log-probs, `*_lengths` the completion token counts (> 0).
    """
    chosen_norm = chosen_logps / chosen_lengths
    rejected_norm = rejected_logps / rejected_lengths
    return (-chosen_norm + alpha * rejected_norm).mean()


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

        from pipeline.steps.merge import base_model_path

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
    trainer = redi_trainer()(model=model, args=args, train_dataset=train_data, processing_class=tokenizer,
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


@functools.cache
def redi_trainer():
    """The DPOTrainer subclass with the REDI loss; built on first use, so importing this module never imports TRL."""
    from trl import DPOTrainer
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    from pipeline.training.token_logprobs import UnsupportedHead, add_token_logprob_forward

    class RediTrainer(DPOTrainer):
        _tag_names = ["trl", "redi", "distillery"]

        def __init__(self, *args, alpha: float, one_sequence_at_a_time: bool = False, **kwargs):
            from unittest import mock

            import trl.trainer.dpo_trainer as dpo_module

            self.alpha, self.one_sequence_at_a_time = alpha, one_sequence_at_a_time
            # Under FSDP, DPOTrainer loads a full reference copy for its log-prob precompute even when, as here,
            # there is nothing to precompute; REDI has no reference, so that load is replaced by "no model".
            with mock.patch.object(dpo_module, "create_model_from_path", lambda *args, **kwargs: None):
                super().__init__(*args, **kwargs)
            # The completion log-probs in chunks (pipeline.training.token_logprobs), patched into the model under the peft
            # wrapper so the call still goes through every wrapper's forward; ZeRO-3 gathers the head's weight for it.
            try:
                add_token_logprob_forward(self.model.get_base_model() if self.is_peft else self.model,
                                          full_params=maybe_gather_lm_head_ctx)
            except UnsupportedHead as error:
                raise UserError(f"redi: {error}") from None

        @property
        def is_peft(self) -> bool:
            return hasattr(self.accelerator.unwrap_model(self.model), "peft_config")

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset  # REDI has no reference model: nothing to precompute

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            completion_mask = inputs["completion_mask"]
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            # One model call over [chosen; rejected] (the collator stacks them), each sequence on its own inside it
            # when one_sequence_at_a_time; log-probs only on completion tokens, 0 elsewhere.
            per_token_logps = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    labels=labels, logprob_chunk_size=LOGPROB_CHUNK_SIZE,
                                    one_sequence_at_a_time=self.one_sequence_at_a_time)
            logps = per_token_logps.sum(dim=1)
            lengths = completion_mask[:, 1:].sum(dim=1)
            if (lengths == 0).any():
                raise UserError("redi: a pair has a completion with no tokens left to score")
            chosen_logps, rejected_logps = logps.chunk(2)
            chosen_lengths, rejected_lengths = lengths.chunk(2)
            loss = redi_loss(chosen_logps, chosen_lengths, rejected_logps, rejected_lengths, self.alpha)

            chosen_norm = self.accelerator.gather_for_metrics(chosen_logps.detach() / chosen_lengths)
            rejected_norm = self.accelerator.gather_for_metrics(rejected_logps.detach() / rejected_lengths)
            metrics = self._metrics[mode]
            metrics["redi/chosen_norm"].append(chosen_norm.mean().item())
            metrics["redi/rejected_norm"].append(rejected_norm.mean().item())
            metrics["redi/margin"].append((chosen_norm - rejected_norm).mean().item())
            if mode == "train":
                self._total_train_tokens += self.accelerator.gather_for_metrics(
                    inputs["attention_mask"].sum()).sum().item()
            metrics["num_tokens"] = [self._total_train_tokens]
            return (loss, per_token_logps) if return_outputs else loss

    return RediTrainer


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
