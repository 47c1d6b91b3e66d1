"""Per-token log-probabilities of given target tokens, without the full-vocabulary logits of the whole sequence.

Why: a causal LM's head turns each position's final hidden state [H] into logits over the whole vocabulary [V]. A loss
that needs only log p(target) at each position (REDI's, SFT's) still gets, from the model's own forward, logits for
every position, [batch, length, V] in float32, and log-softmax keeps another copy of that size for backward. With
SmolLM2's 49,152-entry vocabulary, 2 sequences of 4,096 tokens make 1.5 GiB per copy, three times the 0.5 GiB model,
growing with the length. TRL's fused LM head (`fused_lm_head=True`) tiles the projection too, but in tiles of up to
4,096 positions x 32,768 entries, and where Triton is missing (on a CPU) its torch fallback holds about eight float32
copies of a tile at once in backward: 4 GiB whatever the model.

How: `ChunkedTokenLogProbs` takes the final hidden states of the scored positions [N, H], the head's weight [V, H] (and
bias [V]) and the targets [N], and goes over the positions `chunk_size` at a time: a chunk's logits [chunk, V] are
computed, reduced to the target's logit and the log-partition log Z (in float32), and dropped. Only the hidden states
it was given, the targets and log Z (one float per position) are saved for backward. The backward recomputes each
chunk's logits and turns them into their gradient, (one-hot(target) - softmax) times the incoming gradient; from it
come that chunk's rows of the hidden states' gradient and its share of the weight's (and bias') gradient, which is
accumulated in float32. This is what fused linear cross-entropy kernels (Liger's, TRL's) do, here in plain torch on
any device, and tiled along positions only: each chunk sees the whole vocabulary, so its log Z is exact at once, with
no running logsumexp across vocabulary tiles. At most a few copies of one chunk's logits exist at any time
(chunk_size x V floats each: 192 MiB at 1,024 x 49,152), so the memory it adds does not grow with the length.

Other per-position losses: `ChunkedHeadLoss` does the same for any loss of one position's logits (with that
position's context, e.g. a teacher's final hidden state, from which the teacher's logits are recomputed in the chunk
too): on-policy self-distillation's divergence between the student's and the teacher's distributions (`opsd`). Its
backward differentiates each recomputed chunk with autograd instead of a closed form.

Activations: a long batch's layer activations outgrow all of the above. `one_sequence_at_a_time` runs the batch's
sequences through the model one by one inside non-reentrant activation checkpointing, so backward holds one
sequence's activations (see `add_token_logprob_forward`).

Precision: under autocast (bf16 on a CPU with AMX or a GPU) the projections run in the autocast dtype, as the model's
own lm_head would; log-softmax and the gradients' accumulation run in float32. Without autocast everything runs in the
inputs' dtype, and the result is log_softmax(hidden @ weight.T + bias).gather(target) (tests/test_redi.py checks it
to 1e-5 in float32, with its gradients).

Models: `add_token_logprob_forward(model)` patches a transformers causal LM so that `model(input_ids=...,
attention_mask=..., labels=labels, logprob_chunk_size=n)` returns these log-probs instead of logits. The patched
forward is the model's own, so what wraps the model (peft, accelerate's autocast, DDP, FSDP, DeepSpeed) sees an
ordinary forward call. The final hidden states come from `model.get_decoder()`, the transformer without its head: no
logits, and not every layer's hidden states (`output_hidden_states`) either. The head's weight may be tied to the
input embeddings; its gradient then adds to theirs, as with the model's own head. Heads this would get wrong are
refused (`UnsupportedHead`) rather than silently scored from the wrong weights: a head wrapped by peft (LoRA on
lm_head, or lm_head in modules_to_save; LoRA's 'all-linear' leaves the head out), whose adapter a computation from
the base weight would skip; and models whose logits are scaled or soft-capped after the projection (Gemma 2/3's
final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling, ...).
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024  # positions whose full-vocabulary logits exist at once
# Config attributes of models whose logits are not the plain projection hidden @ weight.T + bias.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


# Forward arguments about what a model output holds; the chunked log-probs return a tensor, whatever they say.
OUTPUT_FLAGS = ("use_cache", "return_dict", "output_attentions", "output_hidden_states")


class UnsupportedHead(ValueError):
    """The model's logits are not a plain linear projection of its final hidden states."""


def no_gathering(*params):
    """The head's parameters are whole already: nothing to gather (see `full_params` below)."""
    return contextlib.nullcontext()


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Float32 logits [rows, V] of some rows of hidden states, projected in the weight's dtype."""
    return torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()


def projection_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the model's own head would project `hidden` in: autocast's where it is on, else hidden's."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def chunks_of_logits(hidden, weight, bias, chunk_size: int, compute_dtype):
    """(rows, float32 logits [chunk, V] of hidden[rows]) for each `chunk_size` rows, projected in compute_dtype."""
    compute_weight = weight.to(compute_dtype)
    compute_bias = None if bias is None else bias.to(compute_dtype)
    for start in range(0, len(hidden), chunk_size):
        rows = slice(start, start + chunk_size)
        yield rows, chunk_logits(hidden[rows], compute_weight, compute_bias)


class ChunkedTokenLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[i, targets[i]] for each row i of hidden [N, H], `chunk_size` rows at a
    time, in forward and (recomputed) in backward.

    `full_params(weight, bias)` is a context in which the parameters hold their full values: DeepSpeed ZeRO-3 keeps
    them partitioned outside their module's forward, and this reads the weight directly (`no_gathering` elsewhere).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, full_params=no_gathering):
        # Kept for backward, which runs outside autocast.
        compute_dtype = projection_dtype(hidden)
        log_z = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        target_logits = torch.empty_like(log_z)
        with full_params(weight, bias):
            for rows, logits in chunks_of_logits(hidden, weight, bias, chunk_size, compute_dtype):
                log_z[rows] = torch.logsumexp(logits, dim=-1)
                target_logits[rows] = logits.gather(-1, targets[rows, None])[:, 0]
        ctx.save_for_backward(hidden, weight, bias, targets, log_z)
        ctx.chunk_size, ctx.compute_dtype, ctx.full_params = chunk_size, compute_dtype, full_params
        return target_logits - log_z

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_logprobs = grad_logprobs.float()
        # Autocast off, should backward run inside it: the dtypes below are chosen, and addmm_ must stay float32.
        with ctx.full_params(weight, bias), torch.autocast(hidden.device.type, enabled=False):
            # Every chunk adds to the whole weight's gradient: summed in float32, whatever the weight's dtype. (Made
            # in here: a partitioned ZeRO-3 parameter has its full shape only while gathered.)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if wants_bias else None
            compute_weight = weight.to(ctx.compute_dtype)
            compute_bias = None if bias is None else bias.to(ctx.compute_dtype)
            for start in range(0, len(hidden), ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                # d log p(target) / d logit_v = 1[v = target] - softmax_v, times the incoming gradient; in place, so a
                # chunk's logits and their gradient are one tensor.
                grad_logits = chunk_logits(hidden[rows], compute_weight, compute_bias)
                grad_logits.sub_(log_z[rows, None]).exp_().mul_(-grad_logprobs[rows, None])
                grad_logits.scatter_add_(-1, targets[rows, None], grad_logprobs[rows, None])
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits.to(ctx.compute_dtype) @ compute_weight
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.t(), hidden[rows].float())
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        return (grad_hidden,
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None)


class ChunkedHeadLoss(torch.autograd.Function):
    """position_loss(logits of hidden[i], targets[i], context[i]) for each row i of hidden [N, H], `chunk_size` rows at
    a time: a per-position loss other than one token's log-prob (a divergence from a teacher's distribution, whose
    hidden states come in `context`), with no full-vocabulary logits of every position.

    `position_loss(logits [n, V] float32, targets [n], context [n, ...]) -> [n]` must treat rows independently (the
    chunks are cut anywhere). Forward runs it without a graph; backward recomputes each chunk's logits and
    differentiates `position_loss` with autograd, so only the hidden states are kept in between, as in
    `ChunkedTokenLogProbs`, whose closed-form backward is cheaper for the log-prob alone.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, context, position_loss, chunk_size: int, full_params=no_gathering):
        compute_dtype = projection_dtype(hidden)
        losses = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        with full_params(weight, bias):
            for rows, logits in chunks_of_logits(hidden, weight, bias, chunk_size, compute_dtype):
                losses[rows] = position_loss(logits, targets[rows], context[rows])
        ctx.save_for_backward(hidden, weight, bias, targets, context)
        ctx.position_loss, ctx.chunk_size, ctx.compute_dtype, ctx.full_params = (position_loss, chunk_size,
                                                                                 compute_dtype, full_params)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets, context = ctx.saved_tensors
        wants = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if wants[0] else None
        with ctx.full_params(weight, bias), torch.autocast(hidden.device.type, enabled=False):
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants[1] else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if wants[2] else None
            for start in range(0, len(hidden), ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                with torch.enable_grad():
                    leaves = [None if tensor is None else tensor.detach().requires_grad_(want)
                              for tensor, want in zip((hidden[rows], weight, bias), wants)]
                    chunk_hidden, chunk_weight, chunk_bias = leaves
                    logits = chunk_logits(chunk_hidden, chunk_weight.to(ctx.compute_dtype),
                                          None if chunk_bias is None else chunk_bias.to(ctx.compute_dtype))
                    losses = ctx.position_loss(logits, targets[rows], context[rows])
                    differentiated = [leaf for leaf, want in zip(leaves, wants) if want]
                    grads = iter(torch.autograd.grad(losses, differentiated, grad_losses[rows].float()))
                if wants[0]:
                    grad_hidden[rows] = next(grads)
                if wants[1]:
                    grad_weight += next(grads)
                if wants[2]:
                    grad_bias += next(grads)
        return (grad_hidden,
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None, None, None)


def token_logprobs(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, full_params=no_gathering,
                   position_loss=None, context: torch.Tensor | None = None) -> torch.Tensor:
    """log p(labels[b, t]) under the logits of hidden_states[b, t] @ weight.T + bias: [batch, length] float32.

    `labels` [batch, length] are the tokens to score at each position (already shifted: the token after position t),
    -100 where nothing is scored; those positions are 0 and cost nothing, not even a chunk of logits.
    With `position_loss`, each scored position gets position_loss(logits, label, context[b, t]) instead (see
    `ChunkedHeadLoss`); `context` [batch, length, ...] is aligned with `labels`.
    """
    scored = labels != -100
    if position_loss is None:
        values = ChunkedTokenLogProbs.apply(hidden_states[scored], weight, bias, labels[scored], chunk_size,
                                            full_params)
    else:
        values = ChunkedHeadLoss.apply(hidden_states[scored], weight, bias, labels[scored], context[scored],
                                       position_loss, chunk_size, full_params)
    # masked_scatter keeps the result on the graph even when no position is scored: a zero loss that still backprops.
    return values.new_zeros(scored.shape).masked_scatter(scored, values)


def head_params(head: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias, whole: FSDP2 shards them (DTensor), and a projection needs every row."""
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return weight, bias


def add_token_logprob_forward(model, full_params=no_gathering) -> None:
    """Patch `model`, a transformers causal LM (under its peft wrapper, if any: patch `get_base_model()`), so that
    `model(input_ids=..., attention_mask=..., labels=labels, logprob_chunk_size=n)` returns `token_logprobs` of
    labels[:, 1:] from the final hidden states at positions [:-1], [batch, length - 1], n positions at a time. Without
    `logprob_chunk_size` the forward is the one it replaces. `full_params` is passed on to `ChunkedTokenLogProbs`.
    `position_ids=` (packed rows, restarting at each row) go to the transformer; with them and no attention_mask, no
    all-ones mask is made up, so transformers keeps the packed rows apart.

    With `one_sequence_at_a_time=True` each sequence of the batch (cut after its last attended position) runs through
    the model on its own inside activation checkpointing (`torch.utils.checkpoint`, non-reentrant): the forward keeps
    only the sequences' token ids, and the backward recomputes one sequence's activations at a time, so they are held
    for one sequence instead of the whole batch, for one more forward pass. It is one call of the model and one
    backward, whatever wraps the model (DDP, FSDP, DeepSpeed see an ordinary forward).

    With `position_loss` (and `position_context`, [batch, length, ...] aligned with `labels`), each scored position
    gets position_loss(logits, label, context) instead of its log-prob (`ChunkedHeadLoss`). With
    `only_final_hidden_states=True` the call returns the transformer's final hidden states [batch, length, H], no
    logits (a teacher's, for the context of another model's `position_loss`). Patching a patched model does nothing.

    Raises UnsupportedHead for a head this cannot score exactly (see the module docstring).
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise UnsupportedHead(
            f"the output head is a {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear; a "
            "peft adapter on the head (LoRA on lm_head, or lm_head in modules_to_save) cannot be trained here: leave "
            "lm_head out of the adapter's target modules")
    text_config = model.config.get_text_config()
    transforms = {name: getattr(text_config, name) for name in LOGIT_TRANSFORMS
                  if getattr(text_config, name, None) not in (None, 1.0)}
    if transforms:
        raise UnsupportedHead(f"this {text_config.model_type} model transforms its logits after the head "
                              f"({', '.join(f'{name}={value}' for name, value in transforms.items())}), which the "
                              "chunked log-probs do not")
    if getattr(model.forward, "chunked_logprobs", False):
        return
    replaced_forward = model.forward

    def final_hidden_states(self, input_ids, attention_mask, position_ids=None):
        # position_ids restarting at each packed row, with no attention mask, keep the rows apart (transformers
        # builds the block-diagonal mask from them; pipeline.training.kd_packing).
        return self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state

    def score(self, input_ids, attention_mask, labels, chunk_size, position_loss, context, position_ids=None):
        hidden_states = final_hidden_states(self, input_ids, attention_mask, position_ids)
        # Looked up on every call: FSDP and DeepSpeed replace or partition the head's parameters after patching.
        weight, bias = head_params(self.get_output_embeddings())
        return token_logprobs(hidden_states[:, :-1], weight, bias, labels[:, 1:], chunk_size, full_params,
                              position_loss, None if context is None else context[:, 1:])

    # The original signature, for whatever inspects it (the Trainer, to pick the dataset columns to keep).
    @functools.wraps(type(model).forward)
    def forward(self, *args, logprob_chunk_size: int | None = None, labels=None, one_sequence_at_a_time: bool = False,
                position_loss=None, position_context=None, only_final_hidden_states: bool = False, **kwargs):
        if logprob_chunk_size is None and not only_final_hidden_states:
            return replaced_forward(*args, labels=labels, **kwargs)
        input_ids, attention_mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask", None)
        position_ids = kwargs.pop("position_ids", None)
        # Wrappers (peft) pass their defaults along; the flags are moot, as no model output is returned.
        unused = sorted(name for name, value in kwargs.items() if value is not None and name not in OUTPUT_FLAGS)
        if args or unused:
            raise TypeError("the chunked log-prob forward takes input_ids, attention_mask and labels by keyword, not "
                            f"{len(args)} positional arguments and {unused}")
        if attention_mask is None and position_ids is None:
            attention_mask = torch.ones_like(input_ids)
        if only_final_hidden_states:
            return final_hidden_states(self, input_ids, attention_mask, position_ids)
        if not one_sequence_at_a_time:
            return score(self, input_ids, attention_mask, labels, logprob_chunk_size, position_loss, position_context,
                         position_ids)
        length = input_ids.shape[1]
        rows = []
        for row in range(len(input_ids)):
            attended = (attention_mask if attention_mask is not None else torch.ones_like(input_ids))[row].nonzero()
            end = int(attended[-1]) + 1 if len(attended) else 1  # padding after the last attended position is cut
            cut = slice(row, row + 1), slice(0, end)
            logprobs = checkpoint(score, self, input_ids[cut], None if attention_mask is None else attention_mask[cut],
                                  labels[cut], logprob_chunk_size, position_loss,
                                  None if position_context is None else position_context[cut],
                                  None if position_ids is None else position_ids[cut], use_reentrant=False)
            rows.append(torch.nn.functional.pad(logprobs, (0, length - end)))
        return torch.cat(rows)

    forward.chunked_logprobs = True
    model.forward = types.MethodType(forward, model)


# ---- scoring given sequences with a model -------------------------------------------------------------------------


def load_scoring_model(model_path: str, who: str, dtype: str):
    """A model for scoring in `dtype` (a `pipeline.core.compute_dtype` choice), eval mode, on the GPU where there is one,
    with the chunked log-prob forward. `who` starts the error message (the step and the role of the model)."""
    from transformers import AutoModelForCausalLM

    from pipeline.core.errors import UserError

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    model = model.to("cuda" if cuda else "cpu").eval()
    try:
        add_token_logprob_forward(model)
    except UnsupportedHead as error:
        raise UserError(f"{who} {model_path}: {error}") from None
    return model


def score_traces(model, tokenizer, batch) -> list[tuple[float, int]]:
    """(summed NLL, tokens) of each (key, token ids, first scored position) in `batch`, in one padded forward:
    -log p of every token from the first scored position on, under `model` (patched by `add_token_logprob_forward`)
    given the tokens before it."""
    longest = max(len(ids) for _, ids, _ in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (_, ids, start) in enumerate(batch):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        labels[i, start:len(ids)] = torch.tensor(ids[start:])
    device = next(model.parameters()).device
    with torch.no_grad():
        logprobs = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         labels=labels.to(device), logprob_chunk_size=DEFAULT_CHUNK_SIZE)
    scored = (labels[:, 1:] != -100).sum(1)
    return [(-float(logprobs[i].sum()), int(scored[i])) for i in range(len(batch))]
