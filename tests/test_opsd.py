"""The opsd step: OPSD on TRL's SDFTTrainer, trained for real on builtin:tiny-random (a 2-layer Llama) on CPU."""

import json

import pytest
import torch
from datasets import Dataset
from pydantic import ValidationError

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.core.recipe import load_recipe
from pipeline.steps import opsd
from pipeline.training.opsd_trainer import copies_ngram, per_token_divergence
from pipeline.training.template_check import teacher_prompt


def problem_rows(count):
    return [{"id": f"p{i}", "problem": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)} for i in range(count)]


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    step_dir = tmp_path_factory.mktemp("problems")
    Dataset.from_list(problem_rows(8)).save_to_disk(str(step_dir / "data"))
    return {"problems": Artifact("problems", "dataset", step_dir)}


def config(**overrides):
    settings = dict(uses="opsd", input="problems", model="builtin:tiny-random", lora={"r": 8}, batch_size=4,
                    learning_rate=5e-3, logging_steps=1, max_length=192, max_tokens=8, save_steps=1000,
                    context_template="{problem} = {answer}")
    return opsd.Config(**{**settings, **overrides})


def output(tmp_path, name="opsd"):
    return Output(name=name, kind="model", dir=tmp_path / name, scratch=tmp_path / f"{name}_scratch", seed=0)


def teacher_logits(trainer, batch):
    """The teacher's logits on a prepared batch, through the trainer's own teacher routing."""
    with torch.no_grad(), trainer._get_teacher_context_for_self_distillation():
        return trainer._forward_logits(trainer.teacher_model, batch["teacher_input_ids"],
                                       batch["teacher_attention_mask"], batch["completion_ids"].size(1))


def student_logits(trainer, batch):
    with torch.no_grad():
        return trainer._forward_logits(trainer.model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                                       torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
                                       batch["completion_ids"].size(1))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_divergence_is_trls_uncapped_and_each_entry_is_capped(beta):
    from trl.experimental.sdft.loss_utils import compute_full_logit_self_distillation_loss

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 50, generator=generator) * 3
    expected = compute_full_logit_self_distillation_loss(student, teacher, distillation_alpha=beta)
    assert torch.allclose(per_token_divergence(student, teacher, beta), expected, atol=1e-5)

    capped = per_token_divergence(student, teacher, beta, cap=0.01)
    assert (capped <= 50 * 0.01 + 1e-6).all() and (capped < expected).any()
    assert (capped >= 0).all()  # a cap never makes the divergence negative (an exploitable objective)
    # Capped entries pass no gradient; the others do.
    student.requires_grad_(True)
    per_token_divergence(student, teacher, beta, cap=0.01).sum().backward()
    assert student.grad.abs().sum() > 0


def test_leak_check_finds_long_shared_ngrams_only():
    context = list(range(100, 140))
    assert copies_ngram([1, 2] + context[5:25] + [3], context, 20)
    assert not copies_ngram([1, 2] + context[5:24] + [3] + context[24:30], context, 20)  # 19, then 6
    assert not copies_ngram(context[:10], context, 20)  # shorter than n


def test_data_from_templates_graded_samples_and_opsd_rows(problems):
    rows, stats = opsd.opsd_dataset(problems["problems"].dataset(), config(), "problems")
    assert stats == {"context_from": "template"} and len(rows) == 8
    assert rows[1]["privileged_context"] == "What is 1 + 4? = 5" and rows[1]["answer"] == "5"
    assert rows[1]["prompt"] == [{"role": "user", "content": "What is 1 + 4?\n\nPlease reason step by step, and put "
                                                             "your final answer within \\boxed{}."}]

    prompt = [{"role": "user", "content": "q"}]
    graded = Dataset.from_list([
        {"id": "a", "sample_idx": 0, "prompt": prompt, "completion": "wrong", "correct": False, "answer": "1"},
        {"id": "a", "sample_idx": 2, "prompt": prompt, "completion": "right later", "correct": True, "answer": "1"},
        {"id": "a", "sample_idx": 1, "prompt": prompt, "completion": "right first", "correct": True, "answer": "1"},
        {"id": "b", "sample_idx": 0, "prompt": prompt, "completion": "wrong", "correct": False, "answer": "2"},
    ])
    rows, stats = opsd.opsd_dataset(graded, config(context_template=None), "graded")
    assert stats == {"context_from": "verified", "problems_without_context": 1}
    assert rows.to_list() == [{"prompt": prompt, "privileged_context": "right first", "answer": "1"}]

    ready = Dataset.from_list([{"id": "x", "prompt": "plain text", "privileged_context": "ref"}])
    rows, _ = opsd.opsd_dataset(ready, config(context_template=None), "ready")
    assert rows[0]["prompt"] == [{"role": "user", "content": "plain text"}]

    with pytest.raises(UserError, match=r"opsd: dataset of step 'problems' has no privileged text.*context_template"):
        opsd.opsd_dataset(problems["problems"].dataset(), config(context_template=None), "problems")
    with pytest.raises(UserError, match="empty privileged_context"):
        opsd.opsd_dataset(Dataset.from_list([{"prompt": "p", "privileged_context": " "}]),
                          config(context_template=None), "ready")


def test_bad_settings_are_refused_at_load():
    with pytest.raises(ValidationError, match="needs support: full"):
        config(divergence_cap=0.05, support="topk")
    with pytest.raises(ValidationError, match="set beta: 1"):
        config(support="sampled_token", beta=0.5)
    with pytest.raises(ValidationError, match="double other braces"):
        config(teacher_template="{prompt} {privileged_context} \\boxed{}")
    with pytest.raises(ValidationError, match="leaves no room"):
        config(max_tokens=192)


def test_teacher_sees_the_privileged_text_and_the_student_does_not(problems, tmp_path):
    trainer, stats = opsd.build_trainer(config(), problems, output(tmp_path))
    assert stats == {"context_from": "template", "rows": 8, "dropped_truncated": 0, "template_checked_rows": 8,
                     "think_prefix": ""}
    trainer.model.train()
    batch = trainer._prepare_training_batch([trainer.train_dataset[i] for i in range(4)])
    tokenizer = trainer.processing_class
    for row in range(4):
        student = tokenizer.decode(batch["prompt_ids"][row][batch["prompt_mask"][row].bool()])
        teacher = tokenizer.decode(batch["teacher_input_ids"][row][batch["teacher_attention_mask"][row].bool()])
        context = trainer.train_dataset[row]["privileged_context"]
        assert context not in student
        assert context in teacher and "Here is a reference solution" in teacher
        assert teacher.endswith(tokenizer.decode(batch["completion_ids"][row][batch["completion_mask"][row].bool()]))
    # the template check composes the teacher's prompt as TRL does
    for row in trainer.train_dataset:
        assert teacher_prompt(row["prompt"], row["privileged_context"], opsd.DEFAULT_TEACHER_TEMPLATE) \
            == trainer.teacher_context_builder.select_generation_prompts([row["prompt"]], [row["privileged_context"]])[0]


def test_rollouts_are_prompted_with_the_think_prefix_and_the_model_keeps_its_template(problems, tmp_path):
    trainer, stats = opsd.build_trainer(config(think_prefix="<think>\n"), problems, output(tmp_path))
    tokenizer = trainer.processing_class
    assert stats["think_prefix"] == "<think>\n"
    rendered = tokenizer.apply_chat_template(trainer.train_dataset[0]["prompt"], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n")
    assert tokenizer.apply_chat_template(trainer.train_dataset[0]["prompt"], tokenize=False).endswith("<|im_end|>\n")
    assert "<think>" not in trainer.own_chat_template  # what train_and_save writes beside the model


def test_teacher_prompts_over_max_length_are_dropped_not_cut(tmp_path):
    prompt = [{"role": "user", "content": "What is 1 + 1?"}]
    rows = [{"prompt": prompt, "privileged_context": "1 + 1 = 2"}] * 3 + [
        {"prompt": prompt, "privileged_context": "one plus one " * 100 + "= 2"}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ready" / "data"))
    inputs = {"ready": Artifact("ready", "dataset", tmp_path / "ready")}
    _, stats = opsd.build_trainer(config(input="ready", context_template=None), inputs, output(tmp_path))
    assert stats == {"context_from": "column", "rows": 3, "dropped_truncated": 1, "template_checked_rows": 4,
                     "think_prefix": ""}
    with pytest.raises(UserError, match="every teacher prompt of dataset 'ready' is longer than max_length"):
        opsd.build_trainer(config(input="ready", context_template=None, max_length=40, max_tokens=8), inputs,
                           output(tmp_path, "short"))


def test_gradients_reach_only_the_student(problems, tmp_path):
    trainer, _ = opsd.build_trainer(config(lora=None), problems, output(tmp_path))
    assert trainer.teacher_model is not trainer.model  # full fine-tuning: a frozen copy
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    trainer.model.train()
    batch = trainer._prepare_training_batch([trainer.train_dataset[i] for i in range(4)])
    logits = trainer._compute_teacher_student_logits(trainer.model, trainer.teacher_model, batch)
    assert logits.student_logits.requires_grad and not logits.teacher_logits.requires_grad
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    trainer.compute_loss(trainer.model, batch).backward()
    assert all(p.grad is None for p in trainer.teacher_model.parameters())
    assert sum(p.grad.abs().sum() for p in trainer.model.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("settings", [dict(beta=0.5), dict(beta=0.0, divergence_cap=0.05), dict(support="topk", topk=5),
                                      dict(support="sampled_token", beta=1.0), dict(lora=None, beta=1.0)],
                         ids=["jsd", "forward-kl-capped", "topk", "sampled-token", "full-finetune-frozen-copy"])
def test_chunked_loss_and_gradients_equal_trls_full_logits(problems, tmp_path, monkeypatch, settings):
    """compute_loss scores 3 positions at a time from hidden states; TRL's loss from the full logits is the same."""
    monkeypatch.setattr("pipeline.training.opsd_trainer.SCORE_CHUNK_SIZE", 3)
    trainer, _ = opsd.build_trainer(config(dtype="float32", **settings), problems, output(tmp_path))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    batch = trainer._prepare_training_batch([trainer.train_dataset[i] for i in range(4)])
    assert batch["completion_mask"].sum() > 4 * 3  # several chunks
    trained = [(name, param) for name, param in trainer.model.named_parameters() if param.requires_grad]

    loss = trainer.compute_loss(trainer.model, batch)
    chunked_grads = torch.autograd.grad(loss, [param for _, param in trained])

    logits = trainer._compute_teacher_student_logits(trainer.model, trainer.teacher_model, batch)
    if trainer.divergence_cap is None:
        expected = trainer._compute_self_distillation_loss(trainer.model, batch, logits)  # TRL's own
    else:
        per_token = per_token_divergence(logits.student_logits, logits.teacher_logits, 0.0, 0.05)
        mask = logits.loss_mask
        expected = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    full_grads = torch.autograd.grad(expected, [param for _, param in trained])

    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    assert max(grad.abs().max() for grad in full_grads) > 1e-3  # large enough for the tolerance to mean something
    for (name, _), chunked_grad, full_grad in zip(trained, chunked_grads, full_grads):
        torch.testing.assert_close(chunked_grad, full_grad, atol=1e-5, rtol=0, msg=lambda text: f"{name}: {text}")


def test_chunked_loss_never_holds_the_logits_of_every_completion_position(problems, tmp_path, monkeypatch):
    """No tensor made in compute_loss's forward or backward has vocabulary-wide rows for more positions than a chunk;
    TRL's own loss (the control, so the check can fail) makes them for every completion position."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestLogits(TorchDispatchMode):
        positions = 0  # the most rows of vocabulary width in one tensor

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for tensor in result if isinstance(result, (tuple, list)) else (result,):
                # [hidden, vocab] is the head's weight transposed for the projection, not logits
                if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == vocab \
                        and tuple(tensor.shape) != (hidden, vocab):
                    self.positions = max(self.positions, tensor.numel() // vocab)
            return result

    monkeypatch.setattr("pipeline.training.opsd_trainer.SCORE_CHUNK_SIZE", 4)
    trainer, _ = opsd.build_trainer(config(dtype="float32"), problems, output(tmp_path))
    vocab, hidden = trainer.model.config.vocab_size, trainer.model.config.hidden_size
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._prepare_training_batch([trainer.train_dataset[i] for i in range(4)])
    completion_positions = int(batch["completion_mask"].sum())
    assert completion_positions > 3 * 4

    with LargestLogits() as chunked:
        trainer.compute_loss(trainer.model, batch).backward()
    with LargestLogits() as full:
        logits = trainer._compute_teacher_student_logits(trainer.model, trainer.teacher_model, batch)
        trainer._compute_self_distillation_loss(trainer.model, batch, logits).backward()
    assert chunked.positions <= 4
    assert full.positions >= completion_positions


def test_training_lowers_the_divergence_and_leaves_the_frozen_teacher_unchanged(problems, tmp_path):
    # float32: bf16 autocast (on where the CPU has it) would round the two forwards differently.
    trainer, _ = opsd.build_trainer(config(max_steps=16, divergence_cap=0.05, dtype="float32"), problems, output(tmp_path))
    trainer.model.train()
    batch = trainer._prepare_training_batch([trainer.train_dataset[i] for i in range(4)])
    teacher_before, student_before = teacher_logits(trainer, batch), student_logits(trainer, batch)

    trainer.train()

    divergence = [entry["self_distillation/distillation_loss"] for entry in trainer.state.log_history
                  if "self_distillation/distillation_loss" in entry]
    assert len(divergence) == 16
    assert sum(divergence[-4:]) / 4 < 0.5 * sum(divergence[:4]) / 4
    # With LoRA the frozen teacher is the base model (adapter disabled): bit-for-bit the same logits.
    assert torch.equal(teacher_logits(trainer, batch), teacher_before)
    assert not torch.allclose(student_logits(trainer, batch), student_before)
    stats = opsd.logged_stats(trainer.state.log_history)
    assert stats["divergence_first"] == divergence[0] and stats["divergence_last"] == divergence[-1]
    assert 1 <= stats["completion_length_mean"] <= 8 and stats["leak_share"] == 0.0
    assert trainer.state.num_input_tokens_seen > 16 * 4 * 8


def test_run_writes_the_adapter_and_the_manifest_stats(problems, tmp_path):
    out = output(tmp_path)
    artifact = opsd.run(config(max_steps=1, teacher="ema"), problems, out)
    assert (out.model_dir / "adapter_config.json").exists()
    assert not (out.model_dir / "teacher").exists()  # the EMA teacher's adapter is not part of the result
    stats = artifact.stats
    assert stats["adapter"] and stats["steps"] == 1 and stats["rows"] == 8
    assert stats["divergence_last"] is not None and stats["leak_share"] == 0.0 and stats["tokens_per_second"] > 0
    assert "on-policy self-distillation" in (out.model_dir / "README.md").read_text()
    json.dumps(stats)


@pytest.mark.parametrize("recipe", ["recipes/opsd-quickstart.yaml", "recipes/opsd-qwen3-1.7b.yaml"])
def test_shipped_recipes_validate(recipe):
    loaded = load_recipe(recipe)
    steps = loaded.steps
    opsd_step = next(cfg for cfg in steps.values() if cfg.uses == "opsd")
    assert opsd_step.teacher == "frozen"
    if "qwen3" in recipe:
        assert (opsd_step.lora.r, opsd_step.lora.alpha, opsd_step.learning_rate) == (64, 128, 2e-4)
        assert opsd_step.batch_size * opsd_step.gradient_accumulation_steps == 32
        assert (opsd_step.max_tokens, opsd_step.temperature, opsd_step.top_p, opsd_step.top_k) == (2048, 1.1, 0.95, 20)
        assert next(cfg for cfg in steps.values() if cfg.uses == "evaluate").preset == "r1"
