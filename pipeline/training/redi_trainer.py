"""The REDI loss (`redi_loss`) and `RediTrainer`, TRL's DPOTrainer with it; the `redi` step assembles and runs it.

REDI (arXiv 2505.24850), exactly as the paper's Eq. 5:

    L = mean over pairs of [ -log pi(y_w|x) / |y_w|  +  alpha * log pi(y_l|x) / |y_l| ]

where log pi(y|x) sums the completion's token log-probs and |y| is that completion's own token count (eos included,
prompt excluded). It is reference-free: no reference model is loaded and no reference forward ever runs.

DPOTrainer gives the preference-data tokenization (chat template, prompt/completion split), the collator that stacks
[chosen; rejected] so both are scored in one forward pass, peft and DeepSpeed/FSDP handling. `RediTrainer` replaces
its loss (`compute_loss`): the policy's log-probs only. For a full fine-tune TRL would load a reference copy of the
model unless reference log-probs are "precomputed"; the step sets that flag and the trainer's precompute does nothing
(under FSDP, where TRL would still load the copy for that precompute, the load is replaced by none). Logged each
logging step: `redi/chosen_norm`, `redi/rejected_norm` (mean length-normalised log-probs) and `redi/margin` (their
difference).

Long traces: the completion tokens' log-probs come from `pipeline.training.token_logprobs`, which projects the final
hidden states onto the vocabulary `LOGPROB_CHUNK_SIZE` positions at a time and recomputes each chunk in backward, so
no full-vocabulary logits of the whole sequence ever exist, and prompt and padding positions are not projected at
all. TRL's fused LM head (what DPOTrainer uses) tiles too, but in 4,096-position x 32,768-entry tiles, scores every
position where Triton is missing, and there its torch fallback holds ~4 GiB of tile temporaries in backward. What
remains and grows with the length is the transformer's own activations. REDI's loss is a sum of per-sequence terms,
so with `one_sequence_at_a_time` each sequence goes through the model on its own inside activation checkpointing and
backward holds one sequence's activations instead of 2 x batch_size (one more forward pass); `gradient_checkpointing`
bounds them further, to each layer's input (see BENCHMARKS.md, "REDI on long pairs"). `use_liger_kernel` swaps
Liger's kernels into the layers only: DPOTrainer turns Liger's fused linear cross-entropy off, and REDI's log-probs
never go through the model's head module anyway.
"""

from __future__ import annotations

from typing import ClassVar
from unittest import mock

import trl.trainer.dpo_trainer as dpo_module
from trl import DPOTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx

from pipeline.core.errors import UserError
from pipeline.training.token_logprobs import UnsupportedHead, add_token_logprob_forward

# Positions whose full-vocabulary logits exist at once (pipeline.training.token_logprobs): 192 MiB of float32 logits
# per copy at SmolLM2's 49,152 entries, a few copies at a time; more positions per chunk are fewer, larger matrix
# products.
LOGPROB_CHUNK_SIZE = 1024


def redi_loss(chosen_logps, chosen_lengths, rejected_logps, rejected_lengths, alpha: float = 0.8):
    """REDI loss: mean over pairs of -chosen_logps/chosen_lengths + alpha * rejected_logps/rejected_lengths.

    `*_logps` are per-sequence SUMS of completion token log-probs, `*_lengths` the completion token counts (> 0).
    """
    chosen_norm = chosen_logps / chosen_lengths
    rejected_norm = rejected_logps / rejected_lengths
    return (-chosen_norm + alpha * rejected_norm).mean()


class RediTrainer(DPOTrainer):
    """DPOTrainer with the REDI loss: no reference model, the completions' log-probs scored in chunks."""

    _tag_names: ClassVar = ["trl", "redi", "distillery"]

    def __init__(self, *args, alpha: float, one_sequence_at_a_time: bool = False, **kwargs):
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`redi_loss` over the batch's pairs (in place of DPOTrainer's loss), and its metrics."""
        completion_mask = inputs["completion_mask"]
        per_token_logps = self.completion_logps(model, inputs)
        logps = per_token_logps.sum(dim=1)
        lengths = completion_mask[:, 1:].sum(dim=1)
        if (lengths == 0).any():
            raise UserError("redi: a pair has a completion with no tokens left to score")
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        loss = redi_loss(chosen_logps, chosen_lengths, rejected_logps, rejected_lengths, self.alpha)
        self.log_pair_metrics(inputs, chosen_logps / chosen_lengths, rejected_logps / rejected_lengths)
        return (loss, per_token_logps) if return_outputs else loss

    def completion_logps(self, model, inputs):
        """Each completion token's log-prob [2 x pairs, length], 0 on prompt and padding positions."""
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        # One model call over [chosen; rejected] (the collator stacks them), each sequence on its own inside it
        # when one_sequence_at_a_time.
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                     logprob_chunk_size=LOGPROB_CHUNK_SIZE, one_sequence_at_a_time=self.one_sequence_at_a_time)

    def log_pair_metrics(self, inputs, chosen_norm, rejected_norm) -> None:
        """The length-normalised log-probs of both sides and their margin, and the trained tokens."""
        mode = "train" if self.model.training else "eval"
        chosen_norm = self.accelerator.gather_for_metrics(chosen_norm.detach())
        rejected_norm = self.accelerator.gather_for_metrics(rejected_norm.detach())
        metrics = self._metrics[mode]
        metrics["redi/chosen_norm"].append(chosen_norm.mean().item())
        metrics["redi/rejected_norm"].append(rejected_norm.mean().item())
        metrics["redi/margin"].append((chosen_norm - rejected_norm).mean().item())
        if mode == "train":
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        metrics["num_tokens"] = [self._total_train_tokens]
