"""`OpsdTrainer`, TRL's SDFTTrainer for on-policy self-distillation, with the capped divergence (`per_token_divergence`)
and the leak check (`copies_ngram`); the `opsd` step assembles and runs it.

What it adds to SDFTTrainer: `divergence_cap` caps each vocabulary entry's term of the full-vocabulary divergence (the
OPSD paper's final setting: forward KL, cap 0.05); the leak check logs `opsd/leak_share`, the share of rollouts that
copy `leak_ngram` or more consecutive tokens of their privileged text verbatim; the student's tokens are counted in
`num_input_tokens_seen`; and the saved model leaves out the EMA teacher's adapter.

Long traces: TRL's loss materialises the student's and the teacher's logits for every completion position,
[batch, completion, vocabulary] in float32 each, plus their log-softmaxes (at 16k tokens and a 152k vocabulary,
10 GiB per copy). `OpsdTrainer.compute_loss` computes the same per-token losses (TRL's functions, or the capped
divergence: `position_loss`) from the final hidden states instead, `SCORE_CHUNK_SIZE` positions at a time, recomputed
in backward (`pipeline.training.token_logprobs.ChunkedHeadLoss`): the teacher's forward returns its hidden states
only.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from trl.experimental.sdft import SDFTTrainer
from trl.experimental.sdft.loss_utils import (
    compute_full_logit_self_distillation_loss,
    compute_sampled_token_self_distillation_loss,
    compute_topk_self_distillation_loss,
)
from trl.trainer.utils import maybe_gather_lm_head_ctx

from pipeline.core.errors import UserError
from pipeline.training.token_logprobs import (
    UnsupportedHead,
    add_token_logprob_forward,
    chunk_logits,
    head_params,
    projection_dtype,
)

# Completion positions whose student and teacher logits exist at once (token_logprobs.ChunkedHeadLoss). Each chunk
# holds ~10 float32 copies of [positions, vocabulary] while its divergence is differentiated: 0.5 GiB at 256 positions
# and SmolLM2's 49,152 entries, 1.5 GiB at Qwen's 151,936.
SCORE_CHUNK_SIZE = 256


def copies_ngram(completion: list[int], context: list[int], n: int) -> bool:
    """Whether `completion` contains n consecutive tokens that also occur consecutively in `context`."""
    if len(completion) < n or len(context) < n:
        return False
    context_grams = {tuple(context[i:i + n]) for i in range(len(context) - n + 1)}
    return any(tuple(completion[i:i + n]) in context_grams for i in range(len(completion) - n + 1))


def per_token_divergence(student_logits, teacher_logits, beta: float, cap: float | None = None):
    """Per position, the generalized JSD over the vocabulary, each entry's term capped at `cap` (if set).

    beta 0: KL(teacher || student); beta 1: KL(student || teacher); in between: beta * KL(T || M) +
    (1 - beta) * KL(S || M) with M = beta * T + (1 - beta) * S. Each KL(P || Q) is summed from the entries
    p * (log p - log q) - p + q: the same total (both sum to 1), but every entry is >= 0, so a cap only bounds an
    entry's pull; capping the plain p * log(p / q), which can be negative, would make the sum unbounded below.
    Uncapped it equals TRL's `compute_divergence`.
    """
    def kl_terms(log_p, log_q):
        p, q = log_p.exp(), log_q.exp()
        return p * (log_p - log_q) - p + q

    student = torch.log_softmax(student_logits, dim=-1)
    teacher = torch.log_softmax(teacher_logits, dim=-1)
    if beta == 0.0:
        terms = kl_terms(teacher, student)
    elif beta == 1.0:
        terms = kl_terms(student, teacher)
    else:
        mixture = torch.logsumexp(torch.stack([student + torch.log1p(torch.tensor(-beta)),
                                               teacher + torch.log(torch.tensor(beta))]), dim=0)
        terms = beta * kl_terms(teacher, mixture) + (1 - beta) * kl_terms(student, mixture)
    if cap is not None:
        terms = terms.clamp(max=cap)
    return terms.sum(-1)


def gather_with(gather, teacher_head, weight, bias):
    """`gather` (TRL's ZeRO-3 gathering context) over the student head's parameters and the teacher head's, each
    once (with a LoRA student the teacher is the same model)."""
    params = []
    for param in (weight, bias, teacher_head.weight, teacher_head.bias):
        if param is not None and not any(param is seen for seen in params):
            params.append(param)
    return gather(*params)


class OpsdTrainer(SDFTTrainer):
    """SDFTTrainer with a per-entry divergence cap, the leak-check metric, a count of trained tokens, a saved model
    without the EMA teacher's adapter, and its loss from chunked hidden states."""

    _tag_names: ClassVar = ["trl", "sdft", "opsd", "distillery"]

    def __init__(self, *args, divergence_cap: float | None, leak_ngram: int, **kwargs):
        self.divergence_cap = divergence_cap
        self.leak_ngram = leak_ngram
        super().__init__(*args, **kwargs)
        self.teacher_head = self._add_chunked_scoring()

    def _add_chunked_scoring(self):
        """Patch the chunked scoring (compute_loss) into the student and the teacher, under their peft and DeepSpeed
        wrappers; returns the teacher's head, which is read inside the student's chunks, so ZeRO-3 gathers both."""
        student, teacher = (self.accelerator.unwrap_model(model) for model in (self.model, self.teacher_model))
        student, teacher = (model.get_base_model() if hasattr(model, "peft_config") else model
                            for model in (student, teacher))
        teacher_head = teacher.get_output_embeddings()
        try:
            for model in (student, teacher):
                add_token_logprob_forward(model, full_params=functools.partial(
                    gather_with, maybe_gather_lm_head_ctx, teacher_head))
        except UnsupportedHead as error:
            raise UserError(f"opsd: {error}") from None
        return teacher_head

    def _prepare_training_batch(self, inputs):
        batch = super()._prepare_training_batch(inputs)
        leak_share = self.leak_share(inputs, batch)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["opsd/leak_share"].append(leak_share)
        if mode == "train":  # the student's tokens (prompt + rollout), as DistillationTrainer counts them
            tokens = batch["prompt_mask"].sum() + batch["completion_mask"].sum()
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()
        return batch

    def leak_share(self, inputs, batch) -> float:
        """The share of the batch's rollouts (over all processes) that copy `leak_ngram` tokens of their privileged
        text."""
        contexts = self._tokenizer([str(example["privileged_context"]) for example in inputs],
                                   add_special_tokens=False)["input_ids"]
        leaks = torch.tensor(
            [float(copies_ngram(completion, context, self.leak_ngram))
             for completion, context in zip(self._get_completion_ids_list(batch), contexts, strict=True)],
            device=self.accelerator.device)
        return self.accelerator.gather(leaks).mean().item()

    def save_model(self, output_dir=None, _internal_call=False):
        # TRL keeps an EMA teacher as a second LoRA adapter: training state for checkpoints, not the final model.
        model = self.accelerator.unwrap_model(self.model)
        if not _internal_call and "teacher" in getattr(model, "peft_config", {}):
            model.delete_adapter("teacher")
        super().save_model(output_dir, _internal_call)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss (SDFTTrainer.compute_loss: the per-token loss averaged over each completion's scored tokens,
        then over completions), without the logits of every position: see the module docstring."""
        if return_outputs or self.use_teacher_server:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss_mask = inputs["completion_mask"].clone()
        loss_mask[:, :self.num_loss_tokens_to_skip] = 0  # as TRL: the first tokens, where teacher-prompt artifacts
        per_token = self.per_token_loss(model, inputs, loss_mask, self.teacher_hidden_states(inputs))
        loss = ((per_token * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1.0)).mean()
        token_mean = (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        mode = "train" if model.training else "eval"
        self._log_self_distillation_metric(mode, self.accelerator.gather(token_mean.detach()).mean().item())
        return loss / (self.current_gradient_accumulation_steps if self.model.training else 1.0)

    def teacher_hidden_states(self, inputs):
        """The teacher's final hidden states over its prompt and the rollout [batch, length, H], without gradient."""
        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            return self.teacher_model(input_ids=inputs["teacher_input_ids"],
                                      attention_mask=inputs["teacher_attention_mask"], only_final_hidden_states=True)

    def per_token_loss(self, model, inputs, loss_mask, teacher_hidden):
        """`position_loss` at each completion position of the student's forward [batch, completion], 0 where
        `loss_mask` is; the student's logits and the teacher's exist `SCORE_CHUNK_SIZE` positions at a time."""
        completion_ids = inputs["completion_ids"]
        length = completion_ids.size(1)
        student_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        # Each completion token's label, and the teacher's hidden state before that token as its context.
        labels = torch.full_like(student_ids, -100)
        labels[:, -length:] = completion_ids.masked_fill(loss_mask == 0, -100)
        context = teacher_hidden.new_zeros(*student_ids.shape, teacher_hidden.size(-1))
        context[:, -length:] = teacher_hidden[:, :-1][:, -length:]
        teacher_dtype = projection_dtype(teacher_hidden)
        return model(input_ids=student_ids,
                     attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                     labels=labels, logprob_chunk_size=SCORE_CHUNK_SIZE,
                     position_loss=functools.partial(self.position_loss, teacher_dtype=teacher_dtype),
                     position_context=context)[:, -length:]

    def position_loss(self, student_logits, completion_ids, teacher_hidden, *, teacher_dtype):
        """The per-token loss of some completion positions, from the student's logits [n, V] and the teacher's
        final hidden states [n, H]: TRL's for `distillation_mode`, or the capped full-vocabulary divergence."""
        teacher_weight, teacher_bias = head_params(self.teacher_head)
        teacher_logits = chunk_logits(teacher_hidden, teacher_weight.detach().to(teacher_dtype),
                                      None if teacher_bias is None else teacher_bias.detach().to(teacher_dtype))
        # TRL's loss functions take [batch, positions, vocabulary] logits divided by the sampling temperature.
        student, teacher = student_logits[None] / self.temperature, teacher_logits[None] / self.temperature
        return self.divergence(student, teacher, completion_ids[None])[0]

    def divergence(self, student, teacher, completion_ids):
        """The per-token loss [batch, positions] of `distillation_mode` between temperature-scaled logits."""
        args = self.args
        if args.distillation_mode == "topk_logits":
            return compute_topk_self_distillation_loss(
                student, teacher, distillation_topk=args.distillation_topk,
                distillation_alpha=args.distillation_alpha, distillation_add_tail=args.distillation_add_tail)
        if args.distillation_mode == "sampled_token":
            return compute_sampled_token_self_distillation_loss(
                student, teacher, completion_ids, distillation_alpha=args.distillation_alpha)
        if self.divergence_cap is not None:
            return per_token_divergence(student, teacher, args.distillation_alpha, self.divergence_cap)
        return compute_full_logit_self_distillation_loss(student, teacher, distillation_alpha=args.distillation_alpha)
