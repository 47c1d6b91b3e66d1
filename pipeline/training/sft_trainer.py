"""`CheckedSFTTrainer`, TRL's SFTTrainer that refuses a batch with no trained token; the `sft` step assembles and runs
it."""

from __future__ import annotations

from trl import SFTTrainer

from pipeline.core.errors import UserError


class CheckedSFTTrainer(SFTTrainer):
    """SFTTrainer that refuses a batch with no trained token (TRL would add a loss of exactly zero)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Position 0 is never predicted, so its label cannot train anything.
        if not (inputs["labels"][..., 1:] != -100).any():
            raise UserError(
                "sft: a training batch has no trainable token (every label is masked), so its loss would be a "
                "silent zero; check that the completions are not empty and that max_length leaves room for them"
            )
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
