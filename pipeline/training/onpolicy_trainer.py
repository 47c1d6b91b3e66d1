"""`OnpolicyGoldTrainer`, TRL's GOLDTrainer (on-policy distillation from a teacher with another tokenizer) with the
metrics TRL's DistillationTrainer logs; the `onpolicy` step assembles and runs it (or, for a teacher with the
student's tokenizer, TRL's DistillationTrainer as it is).
"""

from __future__ import annotations

from typing import ClassVar

from trl.experimental.gold import GOLDTrainer


class OnpolicyGoldTrainer(GOLDTrainer):
    """GOLDTrainer that logs what DistillationTrainer logs and GOLD does not: the rollouts' mean length
    (`completions/mean_length`) and the student's tokens (prompt + rollout) in num_input_tokens_seen."""

    _tag_names: ClassVar = ["trl", "gold", "distillery"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.log_rollouts(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log_rollouts(self, inputs) -> None:
        """The batch's mean completion length (over all processes), and its tokens added to those seen."""
        completion_lengths = (inputs["labels"] != -100).sum(-1).float()
        tokens = inputs["attention_mask"].sum()
        self._metrics["train"]["completions/mean_length"].append(
            self.accelerator.gather(completion_lengths).mean().item())
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()
