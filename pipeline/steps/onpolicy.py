"""`onpolicy`: on-policy distillation from a separate teacher (GKD, arXiv 2306.13649), with TRL's DistillationTrainer.

The student samples its own completions; the teacher scores every token of them; the loss is the per-token
generalized JSD between the two next-token distributions over the full vocabulary (`beta`: 0 forward KL, 1 reverse
KL), averaged over the completion tokens, with the gradient through the student only. TRL does the rollouts (HF
generate, or vLLM with `use_vllm`), the chunked divergence and the logging (`loss` is the divergence;
`completions/mean_length`).

Both distributions are compared token id by token id, so the teacher must use the student's tokenizer. TRL checks
only that the vocabulary sizes agree, and a teacher whose ids mean other tokens (or whose end-of-turn is another
token) would train on silent garbage; this step refuses any difference in the vocabulary or the special tokens, naming
both models. For teachers of another family, distil from their samples instead (sample -> verify -> select -> sft).

Input: rows with `prompt` (chat messages or text, e.g. opsd data) or problems (`problem`, rendered with
`prompt_template`). Prompts longer than `max_length - max_tokens` tokens are dropped and counted, never cut.
Output: as `sft`: a LoRA adapter (for `merge`) or, with `lora: null`, the full model.
"""

from __future__ import annotations

from pydantic import Field

from pipeline.errors import UserError
from pipeline.steps.opsd import RolloutConfig, prompt_with_think_prefix, rollouts_fact
from pipeline.steps.sample import render_prompt
from pipeline.training import (load_tokenizer, model_card, peft_config, train_and_save, train_here_or_launch,
                               training_arguments)

# Special tokens that must be the same in both tokenizers (pad is left out: the step picks its own).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token")


class Config(RolloutConfig):
    input: str = Field(description="Name of the step whose prompts are trained on: rows with `prompt` (chat "
                                   "messages or text) or problems (`problem`).")
    teacher: str = Field(description="Teacher model (builtin:NAME, step:NAME, a local dir or a hub id); it must have "
                                     "the student's tokenizer (vocabulary and special tokens).")
    beta: float = Field(default=1.0, ge=0.0, le=1.0,
                        description="Divergence: 0 forward KL(teacher||student), 1 reverse KL(student||teacher), "
                                    "in between the generalized JSD (0.5: JSD).")

    def model_refs(self) -> list[str]:
        return [self.model, self.teacher]


def run(cfg: Config, inputs, out):
    return train_here_or_launch(cfg, inputs, out)


def train(cfg: Config, inputs, out) -> dict:
    trainer, data_stats = build_trainer(cfg, inputs, out)
    card = model_card(cfg, out.name, trained="trained by on-policy distillation in", batch_unit=" prompts",
                      facts=[f"student: `{cfg.model}`", f"teacher: `{cfg.teacher}` (beta {cfg.beta})",
                             f"prompts: step `{cfg.input}`", rollouts_fact(cfg)])
    stats = train_and_save(trainer, cfg, out, card, chat_template=trainer.own_chat_template,
                           **data_stats)
    divergence = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history
               if "completions/mean_length" in entry]
    return {**stats, "teacher": cfg.teacher, "divergence_first": divergence[0] if divergence else None,
            "divergence_last": divergence[-1] if divergence else None,
            "completion_length_mean": round(sum(lengths) / len(lengths), 2) if lengths else None}


def build_trainer(cfg: Config, inputs, out):
    """A DistillationTrainer (student + frozen teacher) over the prompts, and the data stats."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DistillationConfig, DistillationTrainer

    from pipeline.models import resolve_model

    set_seed(out.seed)
    model_path = resolve_model(cfg.model, inputs)
    teacher_path = resolve_model(cfg.teacher, inputs)
    tokenizer = load_tokenizer(cfg, model_path)
    # The raw tokenizers: load_tokenizer may pick a pad token, which is the step's choice, not the model's.
    check_same_tokenizer(AutoTokenizer.from_pretrained(model_path), AutoTokenizer.from_pretrained(teacher_path),
                         cfg.model, cfg.teacher)
    # Teacher and student read the same token ids (one tokenizer, checked above), so their prompts are the same.
    think, own_template = prompt_with_think_prefix(tokenizer, cfg)
    rows = prompt_dataset(inputs[cfg.input].dataset(), cfg, tokenizer)

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    teacher.requires_grad_(False)
    args = DistillationConfig(
        # Rollout batches are lists, which the Trainer cannot count tokens of; TRL counts them itself.
        **{**training_arguments(cfg, out), "include_num_input_tokens_seen": "no"},
        beta=cfg.beta,
        max_completion_length=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        use_vllm=cfg.use_vllm,
        vllm_mode=cfg.vllm_mode,
        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        vllm_max_model_length=cfg.max_length,
    )
    trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=rows,
                                  processing_class=tokenizer, peft_config=peft_config(cfg.lora))
    trainer.own_chat_template = own_template  # saved with the model (see `prompt_with_think_prefix`)
    return trainer, {"rows": len(rows), "dropped_truncated": len(inputs[cfg.input].dataset()) - len(rows),
                     "think_prefix": think}


def check_same_tokenizer(student, teacher, student_ref: str, teacher_ref: str) -> None:
    """Refuse a teacher whose tokenizer differs from the student's in vocabulary or special tokens."""
    differences = []
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab != teacher_vocab:
        changed = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: item[1])
        differences.append(f"vocabulary: {len(student_vocab)} vs {len(teacher_vocab)} tokens, "
                           f"{len({token for token, _ in changed})} differ (first: {changed[0][0]!r})")
    for name in SPECIAL_TOKENS:
        if getattr(student, name) != getattr(teacher, name):
            differences.append(f"{name}: {getattr(student, name)!r} vs {getattr(teacher, name)!r}")
    if set(student.all_special_tokens) != set(teacher.all_special_tokens):
        only = sorted(set(student.all_special_tokens) ^ set(teacher.all_special_tokens))
        differences.append(f"special tokens in only one of them: {', '.join(map(repr, only[:5]))}")
    if differences:
        raise UserError(
            f"onpolicy: teacher {teacher_ref!r} and student {student_ref!r} have different tokenizers "
            f"({'; '.join(differences)}, student vs teacher). The divergence compares their next-token "
            "distributions id by id, so they must share one tokenizer: pick a teacher of the student's family, or "
            "distil from the teacher's samples (sample -> verify -> select -> sft)"
        )


def prompt_dataset(dataset, cfg: Config, tokenizer):
    """Chat-message `prompt` rows that leave room for a rollout of max_tokens within max_length."""
    columns = dataset.column_names
    if "prompt" in columns:
        rows = dataset.select_columns(["prompt"]).map(
            lambda row: {"prompt": row["prompt"] if isinstance(row["prompt"], list)
                         else [{"role": "user", "content": row["prompt"]}]}, keep_in_memory=True)
    elif "problem" in columns:
        rows = dataset.map(lambda row: {"prompt": [{"role": "user",
                                                    "content": render_prompt(cfg.prompt_template, row)}]},
                           remove_columns=columns, keep_in_memory=True)
    else:
        raise UserError(f"onpolicy: dataset of step {cfg.input!r} has neither a prompt nor a problem column "
                        f"(it has {', '.join(columns)})")
    limit = cfg.max_length - cfg.max_tokens
    kept = rows.filter(lambda row: len(tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]) <= limit,
        keep_in_memory=True, desc="onpolicy: dropping prompts over max_length")
    if len(kept) == 0:
        raise UserError(f"onpolicy: every prompt of dataset {cfg.input!r} is longer than max_length - max_tokens = "
                        f"{limit} tokens; raise max_length")
    return kept
