"""The top-K logit-distillation loss (pipeline.training.kd_loss) against direct full-vocabulary computations: values and
gradients, K = V as full forward KL, the tail term where a clamp would zero its gradient, TAID, chunking, and TAID's
adaptive schedule."""

from __future__ import annotations

import pytest
import torch

from pipeline.training.kd_loss import TaidSchedule, kd_token_losses, pack_teacher

V, H = 64, 16


def make_case(seed=0, batch=2, length=7, k=5, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, H, generator=generator, dtype=dtype)
    weight = torch.randn(V, H, generator=generator, dtype=dtype) * 0.5
    bias = torch.randn(V, generator=generator, dtype=dtype) * 0.1
    teacher_logits = torch.randn(batch, length, V, generator=generator, dtype=torch.float64) * 2
    teacher_logprobs = torch.log_softmax(teacher_logits, -1)
    top = teacher_logprobs.topk(k, dim=-1)
    labels = torch.randint(0, V, (batch, length), generator=generator)
    labels[0, :2] = -100  # prompt positions: not scored
    return hidden, weight, bias, labels, top.indices, top.values


def reference(hidden, weight, bias, labels, ids, teacher_lp, temperature=1.0, t=1.0, nll_weight=0.0):
    """The loss summed over scored positions, straight from the full [N, V] logits in float64, with 1 - sum for the
    student's tail (exact in float64 on these inputs)."""
    scored = labels != -100
    logits = (hidden.double() @ weight.double().T + bias.double())[scored]
    ids, teacher_lp = ids[scored], teacher_lp[scored].double()
    student_full = torch.log_softmax(logits / temperature, -1)
    at_ids = student_full.gather(-1, ids)
    student = torch.cat([at_ids, torch.log1p(-at_ids.exp().sum(-1, keepdim=True))], -1)
    teacher_tail = (1 - teacher_lp.exp().sum(-1, keepdim=True)).clamp(min=0)
    teacher = torch.log_softmax(torch.cat([teacher_lp, teacher_tail.log()], -1) / temperature, -1)
    if t < 1:
        teacher = torch.log_softmax(t * teacher + (1 - t) * student.detach(), -1)
    loss = temperature ** 2 * (teacher.exp() * (teacher - student)).sum(-1)
    nll = -torch.log_softmax(logits, -1).gather(-1, labels[scored][:, None])[:, 0]
    return (loss + nll_weight * nll).sum()


def ours(hidden, weight, bias, labels, ids, teacher_lp, chunk_size=1024, **settings):
    return kd_token_losses(hidden, weight, bias, labels, pack_teacher(ids, teacher_lp), chunk_size=chunk_size,
                           **settings).sum()


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("settings", [{}, {"temperature": 2.0}, {"nll_weight": 0.5}, {"t": 0.4, "temperature": 1.5}])
def test_equals_full_vocabulary_computation_with_gradients(settings):
    hidden, weight, bias, labels, ids, teacher_lp = make_case()
    params = [p.requires_grad_() for p in (hidden, weight, bias)]
    got = ours(hidden, weight, bias, labels, ids, teacher_lp, **settings)
    want = reference(hidden, weight, bias, labels, ids, teacher_lp, **settings)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    for g, w in zip(grads(got, params), grads(want, params)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # positions with label -100 cost nothing and receive no gradient
    unscored = kd_token_losses(hidden, weight, bias, labels, pack_teacher(ids, teacher_lp), **settings)
    assert (unscored[0, :2] == 0).all() and (unscored[labels != -100] != 0).all()


def test_k_equal_to_vocabulary_is_full_forward_kl():
    hidden, weight, bias, labels, _, _ = make_case(seed=1)
    teacher_lp = torch.log_softmax(torch.randn(2, 7, V, generator=torch.Generator().manual_seed(5)), -1)
    ids = teacher_lp.argsort(-1, descending=True)
    sorted_lp = teacher_lp.gather(-1, ids)
    params = [p.requires_grad_() for p in (hidden, weight, bias)]
    got = ours(hidden, weight, bias, labels, ids, sorted_lp)
    scored = labels != -100
    student = torch.log_softmax(hidden @ weight.T + bias, -1)[scored]
    full_kl = torch.nn.functional.kl_div(student, teacher_lp[scored], log_target=True, reduction="sum")
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(full_kl.item(), abs=1e-5)
    for g, w in zip(grads(got, params), grads(full_kl, params)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_tail_gradient_survives_where_a_clamp_would_zero_it():
    # The student puts all but ~1e-7 of its mass on the teacher's K ids: in float32 1 - sum rounds to (nearly) 0 and a
    # clamped log(1 - sum) has no gradient, though the teacher keeps 30% in the tail.
    k = 4
    logits = torch.zeros(1, V)
    ids = torch.arange(k)[None]
    logits[0, :k] = 20.0
    teacher_lp = torch.log(torch.full((1, k), 0.7 / k))
    labels = torch.zeros(1, 1, dtype=torch.long)
    hidden = logits[:, None, :].clone().requires_grad_()  # head = identity: the hidden states are the logits
    weight, bias = torch.eye(V), None

    got = kd_token_losses(hidden, weight, bias, labels, pack_teacher(ids[:, None], teacher_lp[:, None])).sum()
    (ours_grad,) = grads(got, [hidden])
    exact = hidden.detach().double().requires_grad_()
    (want,) = grads(reference(exact, weight.double(), torch.zeros(V, dtype=torch.float64), labels, ids[:, None],
                              teacher_lp[:, None]), [exact])
    tail = slice(k, V)
    assert want[0, 0, tail].abs().min() > 1e-3  # the tail tokens must get pulled up
    torch.testing.assert_close(ours_grad[0, 0].double(), want[0, 0], atol=1e-5, rtol=1e-4)

    # What a clamp gives on the same input: no gradient to any tail token (what this test guards against).
    naive = hidden.detach().clone().requires_grad_()
    q = torch.softmax(naive[0], -1)
    q_ids = q.gather(-1, ids)
    naive_tail = torch.log(torch.clamp(1 - q_ids.sum(-1), min=1e-6))
    (naive_grad,) = grads(-0.3 * naive_tail.sum(), [naive])
    assert (naive_grad == 0).all()


def test_taid_at_t_one_is_kd_and_at_t_zero_is_nothing():
    hidden, weight, bias, labels, ids, teacher_lp = make_case(seed=2)
    params = [p.requires_grad_() for p in (hidden, weight, bias)]
    kd = ours(hidden, weight, bias, labels, ids, teacher_lp)
    near_one = ours(hidden, weight, bias, labels, ids, teacher_lp, t=1 - 1e-7)
    assert near_one.item() == pytest.approx(kd.item(), rel=1e-6)
    for g, w in zip(grads(near_one, params), grads(kd, params)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    # t = 0: the target is the (detached) student itself, so no loss and no gradient
    at_zero = ours(hidden, weight, bias, labels, ids, teacher_lp, t=0.0)
    assert at_zero.item() == pytest.approx(0.0, abs=1e-5)
    assert all(g.abs().max() < 1e-5 for g in grads(at_zero, params))


@pytest.mark.parametrize("settings", [{}, {"t": 0.6, "nll_weight": 0.3, "temperature": 0.8}])
def test_chunking_gives_the_same_values_and_gradients(settings):
    hidden, weight, bias, labels, ids, teacher_lp = make_case(seed=3, length=9)
    params = [p.requires_grad_() for p in (hidden, weight, bias)]
    whole = kd_token_losses(hidden, weight, bias, labels, pack_teacher(ids, teacher_lp), chunk_size=1024, **settings)
    whole_grads = grads(whole.sum(), params)
    for chunk_size in (1, 3, 5):
        cut = kd_token_losses(hidden, weight, bias, labels, pack_teacher(ids, teacher_lp), chunk_size=chunk_size,
                              **settings)
        torch.testing.assert_close(cut, whole, atol=1e-6, rtol=1e-6)
        for g, w in zip(grads(cut.sum(), params), whole_grads):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_float16_teacher_log_probs_summing_over_one_are_renormalised():
    hidden, weight, bias, labels, ids, _ = make_case(seed=4, k=3)
    over = torch.log(torch.full((*ids.shape[:-1], 3), 0.34, dtype=torch.float16))  # sums to 1.02
    loss = kd_token_losses(hidden, weight, bias, labels, pack_teacher(ids, over))
    assert torch.isfinite(loss).all() and (loss[labels != -100] > 0).all()
    # its tail is then empty (clamped to 0): TAID at t = 0 and t = 0.5 must stay finite too
    for t in (0.0, 0.5):
        assert torch.isfinite(kd_token_losses(hidden, weight, bias, labels, pack_teacher(ids, over), t=t)).all()


def test_taid_schedule_follows_the_adaptive_rule():
    steps = 100
    falling, rising = TaidSchedule(steps, alpha=0.05), TaidSchedule(steps, alpha=0.05)
    assert falling.t == rising.t == 0.4
    history = []
    for step in range(1, steps + 1):
        falling.update(10.0 / step, step)  # objective keeps falling: momentum > 0, faster than the linear floor
        rising.update(1.0 + step, step)  # rising: momentum < 0, sigmoid < 1/2, slower steps
        history.append(falling.t)
        floor = 0.4 + 0.6 * step / steps
        assert floor - 1e-12 <= rising.t <= falling.t <= 1.0
    assert history == sorted(history) and history[-1] == 1.0 and rising.t == 1.0
    assert falling.momentum > 0 > rising.momentum
    # one step by hand: delta = (J0 - J1) / J0, m = (1 - beta) * delta, t = t0 + alpha * sigmoid(m) * (1 - t0)
    schedule = TaidSchedule(10 ** 6, alpha=0.1, beta=0.9)
    schedule.update(2.0, 1)
    t1 = 0.4 + 0.1 * 0.5 * 0.6  # m = 0 on the first step: sigmoid(0) = 1/2
    assert schedule.t == pytest.approx(t1)
    schedule.update(1.0, 2)
    m = 0.1 * 0.5
    assert schedule.momentum == pytest.approx(m)
    assert schedule.t == pytest.approx(t1 + 0.1 / (1 + torch.exp(torch.tensor(-m)).item()) * (1 - t1))
    with pytest.raises(ValueError):
        TaidSchedule(10, t_start=0.9, t_end=0.5)
