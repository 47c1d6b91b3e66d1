"""The logit-distillation loss on stored top-K teacher distributions (`kd_token_losses`), TAID's target and its
adaptive schedule (`TaidSchedule`): pure torch, no trainer.

What is compared: at each completion position the teacher's distribution is known only at its top-K token ids
(the stored log-probs, `pipeline.text.teacher_logprobs`). Both distributions are therefore reduced to the same K + 1
buckets: the K ids, and one tail bucket holding everything else. The teacher's tail mass is 1 - sum of its top-K
probabilities (a constant, clamped at 0: float16 log-probs can sum to a hair over 1; the K + 1 masses are then
renormalised), the student's is 1 - sum of its probabilities at the same K ids. The loss at a position is

    tau^2 * KL(p || q) = tau^2 * sum over the K + 1 buckets b of  p_b * (log p_b - log q_b)
                         (+ nll_weight * -log q(sampled token), at temperature 1)

With K = the vocabulary size the tail is empty on both sides and this is the full forward KL.

The student's tail, log q_tail = log(1 - sum_K q_i), is computed as logsumexp(student logits with the K ids masked
out) - log Z: a log-sum-exp over the tail's own logits, exact however close sum_K q_i comes to 1. The naive
log(clamp(1 - sum_K q_i, eps)) loses every tail token's gradient once sum_K q_i rounds to 1 in float32 (a confident
student: the step that should push mass back into the tail gets none); tests/test_kd_loss.py checks such a case
against float64.

Temperature tau: the student's logits are divided by tau (exact: its tail comes from the same logits); the teacher's
stored log-probs are of its temperature-1 distribution, whose tail's shape is unknown, so its K + 1 bucket masses are
tempered as atoms, p_b^(1/tau) renormalised. That is exact at tau = 1 (the default) and at K = V; in between the
teacher's tail is treated as one token. The KL is multiplied by tau^2 (Hinton et al.), so its gradient's scale does
not shrink with tau.

Memory: the loss needs the student's log-softmax only at the K ids, its tail log-sum-exp and log Z, so it runs as a
per-position loss of `pipeline.training.token_logprobs.ChunkedHeadLoss`: `chunk_size` positions' full-vocabulary
logits exist at a time (O(chunk x V)), recomputed in backward, never O(sequence x V). The teacher's ids and log-probs
travel to it as one float32 context tensor [..., 2K] (`pack_teacher`; ids up to 2^24 are exact in float32).

TAID (Shing et al., "TAID: Temporally Adaptive Interpolated Distillation", ICLR 2025, arXiv 2501.16937). Its
intermediate target (the paper's definition of p_t, section 3.1) is a softmax interpolation of the detached student's
and the teacher's logits,

    p_t = softmax((1 - t) * stopgrad(logit_q) + t * logit_p),    loss J(t) = KL(p_t || q_theta),

here over the same K + 1 buckets with bucket log-probs in place of logits (log-probs differ from logits by a
per-distribution constant, which the softmax removes). At t = 1 it is the KD loss above exactly. t moves from t_start
to t_end by the paper's adaptive update (its Algorithm 1, section 3.2), after each optimizer step n with objective
value J_n:

    delta_n = (J_{n-1} - J_n) / (J_{n-1} + eps)               relative change of the objective
    m_n     = beta * m_{n-1} + (1 - beta) * delta_n           momentum (m_0 = 0)
    t_{n+1} = min(t_end, max(t_linear(n), t_n + alpha * sigmoid(m_n) * (1 - t_n)))

with t_linear(n) = t_start + (t_end - t_start) * n / N the linear floor over the N training steps, and the paper's
defaults t_start = 0.4, t_end = 1.0, alpha = 5e-4, beta = 0.99. (The equation's number in the paper could not be
checked offline; the rule is that of the paper's Algorithm 1 and the authors' code.) Note the interpolation is in log
space, as the paper defines it, not the arithmetic mixture (1 - t) * q + t * p.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from pipeline.training.token_logprobs import DEFAULT_CHUNK_SIZE, no_gathering, token_logprobs

LARGEST_EXACT_ID = 2 ** 24  # token ids travel as float32 in the context tensor: exact below this


def pack_teacher(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """The teacher's top-K ids [..., K] and log-probs [..., K] as one float32 tensor [..., 2K] (a `ChunkedHeadLoss`
    context is one tensor)."""
    if topk_ids.numel() and int(topk_ids.max()) >= LARGEST_EXACT_ID:
        raise ValueError(f"token id {int(topk_ids.max())} is above {LARGEST_EXACT_ID}, which float32 cannot hold "
                         "exactly")
    return torch.cat([topk_ids.float(), topk_logprobs.float()], dim=-1)


def teacher_buckets(topk_logprobs: torch.Tensor, tail_empty: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's log-masses [n, K + 1] over its K ids and the tail (no gradient: the stored distribution)."""
    logprobs = topk_logprobs.float()
    tail = (1.0 - logprobs.exp().sum(-1)).clamp(min=0.0)
    tail = torch.where(tail_empty, torch.zeros_like(tail), tail)
    buckets = torch.cat([logprobs, tail.log()[:, None]], dim=-1)  # log 0 = -inf: an empty bucket
    return torch.log_softmax(buckets / temperature, dim=-1)  # renormalised (and tempered as atoms)


def student_buckets(logits: torch.Tensor, ids: torch.Tensor, temperature: float):
    """The student's log-masses [n, K + 1] at the K ids and the tail, at `temperature`, and whether each row's tail
    is empty (the K ids cover the vocabulary). The tail is a log-sum-exp over its own logits: no 1 - sum."""
    scaled = logits / temperature
    log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)
    at_ids = scaled.gather(-1, ids) - log_z
    masked = scaled.scatter(-1, ids, float("-inf"))
    tail_empty = torch.isneginf(masked).all(-1)
    # A row with an empty tail gets a finite stand-in, so that its (unused) log-sum-exp has no NaN gradient.
    safe = torch.where(tail_empty[:, None], torch.zeros_like(masked), masked)
    tail = torch.logsumexp(safe, dim=-1) - log_z[:, 0]
    tail = torch.where(tail_empty, torch.full_like(tail, float("-inf")), tail)
    return torch.cat([at_ids, tail[:, None]], dim=-1), tail_empty


def bucket_kl(target: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(target || student) [n] from log-masses [n, B]; a bucket the target gives no mass adds nothing."""
    mass = target.exp()
    terms = mass * (target - student)
    return torch.where(mass > 0, terms, torch.zeros_like(terms)).sum(-1)


def topk_kd_position_loss(logits: torch.Tensor, targets: torch.Tensor, context: torch.Tensor, *,
                          temperature: float = 1.0, t: float = 1.0, nll_weight: float = 0.0) -> torch.Tensor:
    """The loss [n] of each row of one chunk of float32 student logits [n, V]: tau^2 * KL(target || student) over the
    teacher's K ids and the tail, where the target is the teacher (t = 1) or TAID's interpolation at t, plus
    nll_weight * -log q(targets). `context` [n, 2K] is `pack_teacher`'s."""
    k = context.shape[-1] // 2
    ids, teacher_logprobs = context[:, :k].long(), context[:, k:]
    student, tail_empty = student_buckets(logits, ids, temperature)
    target = teacher_buckets(teacher_logprobs, tail_empty, temperature)
    if t < 1.0:
        # TAID: log-space interpolation with the detached student. At t = 0 the teacher's part is left out rather
        # than multiplied (0 * -inf, an empty teacher tail, is NaN); an empty bucket on either side stays empty.
        teacher_part = t * target if t > 0 else torch.zeros_like(target)
        target = torch.log_softmax(teacher_part + (1.0 - t) * student.detach(), dim=-1)
    loss = temperature ** 2 * bucket_kl(target, student)
    if nll_weight:
        loss = loss - nll_weight * (logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))
    return loss


def kd_token_losses(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    labels: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0, t: float = 1.0,
                    nll_weight: float = 0.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    full_params=no_gathering) -> torch.Tensor:
    """`topk_kd_position_loss` at every scored position of hidden_states [batch, length, H] under the head
    (weight [V, H], bias [V]): [batch, length], 0 where labels is -100. `teacher` [batch, length, 2K] is
    `pack_teacher`'s, aligned with `labels` (already shifted: the distribution over the token after position t)."""
    return token_logprobs(hidden_states, weight, bias, labels, chunk_size, full_params,
                          position_loss=position_loss(temperature, t, nll_weight), context=teacher)


def position_loss(temperature: float = 1.0, t: float = 1.0, nll_weight: float = 0.0):
    """`topk_kd_position_loss` with its settings bound, as a `ChunkedHeadLoss` position loss (or a patched model's
    `position_loss=`, `pipeline.training.token_logprobs.add_token_logprob_forward`)."""
    return functools.partial(topk_kd_position_loss, temperature=temperature, t=t, nll_weight=nll_weight)


@dataclass
class TaidSchedule:
    """TAID's interpolation parameter t and its adaptive update (the module docstring has the equations)."""

    total_steps: int
    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    eps: float = 1e-15
    t: float = field(init=False)
    momentum: float = field(default=0.0, init=False)
    previous: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_start <= self.t_end <= 1.0:
            raise ValueError(f"TAID needs 0 <= t_start <= t_end <= 1, got {self.t_start} and {self.t_end}")
        self.t = self.t_start

    def update(self, objective: float, step: int) -> float:
        """t after optimizer step `step` (1-based) whose TAID objective was `objective`; returns the new t."""
        if not math.isfinite(objective):
            return self.t  # a non-finite loss says nothing about progress
        if self.previous is not None:
            delta = (self.previous - objective) / (self.previous + self.eps)
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
        self.previous = objective
        linear = self.t_start + (self.t_end - self.t_start) * min(step / max(self.total_steps, 1), 1.0)
        adaptive = self.t + self.alpha * (1.0 / (1.0 + math.exp(-self.momentum))) * (1.0 - self.t)
        self.t = min(self.t_end, max(linear, adaptive))
        return self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "momentum": self.momentum, "previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.momentum, self.previous = state["t"], state["momentum"], state["previous"]
