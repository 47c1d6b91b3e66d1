"""`KdTrainer`, TRL's SFTTrainer trained on stored top-K teacher distributions (the loss of
`pipeline.training.kd_loss`, in place of SFT's cross-entropy), and `KdCollator`, its batches; the `kd` step assembles
and runs them.

The rows come tokenized: the teacher's own prompt and completion token ids (`pipeline.text.teacher_logprobs`), so the
student reads exactly the tokens the teacher's distributions were computed for; a student with another token table is
refused before this (the `kd` step). SFTTrainer's dataset preparation is skipped (`skip_prepare_dataset`); the collator
pads `input_ids` and `labels` (the completion tokens, -100 on the prompt and padding) and lays each completion
token's teacher top-K ids and log-probs at its position, packed into one float tensor [batch, length, 2K]
(`kd_loss.pack_teacher`). Packed sequences (`packing: true`) are collated by `kd_packing.collate_packed`, with
position_ids restarting at each row; `compute_loss` then gives the model no attention mask, so rows stay apart.

`compute_loss` runs the model's patched forward (`pipeline.training.token_logprobs.add_token_logprob_forward`) with the
KD loss as the per-position loss: full-vocabulary logits of `LOGPROB_CHUNK_SIZE` positions at a time, recomputed in
backward, never of the whole batch. The loss is the per-token mean over the batch's completion tokens (over the
gradient-accumulation window when the Trainer counts the tokens, as TRL's SFT loss is).

TAID (`objective: taid`): the trainer holds a `kd_loss.TaidSchedule`; each micro-batch's loss at the current t is
averaged over the optimizer step and handed to the schedule when the step ends, which moves t (the paper's adaptive
update). `kd/taid_t` is logged with the loss. The schedule's state is saved in each checkpoint's trainer state, so a
resumed run goes on with the t and momentum it had.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from trl import SFTTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx

from pipeline.core.errors import UserError
from pipeline.training.kd_loss import TaidSchedule, pack_teacher, position_loss
from pipeline.training.kd_packing import collate_packed
from pipeline.training.token_logprobs import UnsupportedHead, add_token_logprob_forward

# Positions whose full-vocabulary logits exist at once (as in pipeline.training.redi_trainer).
LOGPROB_CHUNK_SIZE = 1024


class KdCollator:
    """Rows (input_ids, labels, teacher_topk_ids, teacher_topk_logprobs, completion_start) -> a padded batch with the
    teacher [batch, length, 2K] aligned with the labels (zeros where nothing is scored)."""

    def __init__(self, pad_token_id: int, k: int):
        self.pad_token_id, self.k = pad_token_id, k

    def __call__(self, rows: list[dict]) -> dict:
        if "seq_lengths" in rows[0]:  # packed sequences (`packing: true`)
            return collate_packed(rows, self.pad_token_id, self.k)
        longest = max(len(row["input_ids"]) for row in rows)
        batch = len(rows)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        labels = torch.full((batch, longest), -100, dtype=torch.long)
        teacher_ids = torch.zeros((batch, longest, self.k), dtype=torch.long)
        teacher_logprobs = torch.zeros((batch, longest, self.k), dtype=torch.float32)
        for i, row in enumerate(rows):
            length, start = len(row["input_ids"]), row["completion_start"]
            input_ids[i, :length] = torch.tensor(row["input_ids"])
            attention_mask[i, :length] = 1
            labels[i, start:length] = input_ids[i, start:length]
            teacher_ids[i, start:length] = torch.tensor(row["teacher_topk_ids"], dtype=torch.long)
            teacher_logprobs[i, start:length] = torch.tensor(row["teacher_topk_logprobs"], dtype=torch.float32)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "teacher": pack_teacher(teacher_ids, teacher_logprobs)}


class TaidStep(TrainerCallback, ExportableState):
    """Hands the finished optimizer step's mean TAID objective to the trainer's schedule; the schedule's state (t, its
    momentum, the last objective) is saved with each checkpoint and read back when training resumes from one."""

    def __init__(self, trainer: KdTrainer):
        self.trainer = trainer

    def state(self) -> dict:
        return {"args": {}, "attributes": {"schedule": self.trainer.taid.state_dict()}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, dict) and "schedule" in saved.get("attributes", {}):
            self.trainer.taid.load_state_dict(saved["attributes"]["schedule"])

    def on_step_end(self, args, state, control, **kwargs):
        losses = self.trainer.step_losses
        if losses:
            self.trainer.taid.update(sum(losses) / len(losses), state.global_step)
        self.trainer.step_losses = []


class KdTrainer(SFTTrainer):
    """SFTTrainer with the top-K KD loss (or TAID's) on stored teacher distributions."""

    _tag_names: ClassVar = ["trl", "kd", "distillery"]

    def __init__(self, *args, temperature: float = 1.0, nll_weight: float = 0.0, taid: TaidSchedule | None = None,
                 one_sequence_at_a_time: bool = False, **kwargs):
        self.temperature, self.nll_weight, self.taid = temperature, nll_weight, taid
        self.one_sequence_at_a_time = one_sequence_at_a_time
        self.step_losses: list[float] = []
        super().__init__(*args, **kwargs)
        try:
            add_token_logprob_forward(self.model.get_base_model() if self.is_peft else self.model,
                                      full_params=maybe_gather_lm_head_ctx)
        except UnsupportedHead as error:
            raise UserError(f"kd: {error}") from None
        if taid is not None:
            self.add_callback(TaidStep(self))

    @property
    def is_peft(self) -> bool:
        return hasattr(self.accelerator.unwrap_model(self.model), "peft_config")

    def _set_signature_columns_if_needed(self):
        # The collator's inputs: the Trainer must not drop them as "unused" by the model's forward.
        self._signature_columns = ["input_ids", "labels", "completion_start", "teacher_topk_ids",
                                   "teacher_topk_logprobs", "completion_mask", "seq_lengths"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean KD (or TAID) loss per completion token of the batch."""
        labels = inputs["labels"]
        scored = (labels[:, 1:] != -100).sum()
        if not scored:
            raise UserError("kd: a training batch has no completion token to distil, so its loss would be a silent "
                            "zero; check that the completions are not empty")
        t = self.taid.t if self.taid is not None else 1.0
        # Packed rows: no attention mask, so the restarting position_ids keep the rows apart (`kd_packing`).
        packed = "position_ids" in inputs
        per_position = model(input_ids=inputs["input_ids"], labels=labels,
                             attention_mask=None if packed else inputs["attention_mask"],
                             position_ids=inputs["position_ids"] if packed else None,
                             logprob_chunk_size=LOGPROB_CHUNK_SIZE, one_sequence_at_a_time=self.one_sequence_at_a_time,
                             position_loss=position_loss(self.temperature, t, self.nll_weight),
                             position_context=inputs["teacher"])
        tokens = scored if num_items_in_batch is None else num_items_in_batch
        loss = per_position.sum() / torch.as_tensor(tokens, device=per_position.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        mode = "train" if self.model.training else "eval"
        mean = self.accelerator.gather_for_metrics(per_position.detach().sum()).sum() / \
            self.accelerator.gather_for_metrics(scored).sum()
        if mode == "train" and self.taid is not None:
            self.step_losses.append(mean.item())
        metrics = self._metrics[mode]
        metrics["kd/loss_per_token"].append(mean.item())
        if self.taid is not None:
            metrics["kd/taid_t"].append(t)
        if mode == "train":
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        metrics["num_tokens"] = [self._total_train_tokens]
        return (loss, per_position) if return_outputs else loss
