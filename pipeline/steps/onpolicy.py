"""`onpolicy`: on-policy distillation from a separate teacher (GKD, arXiv 2306.13649), with TRL's DistillationTrainer,
or TRL's GOLDTrainer when the teacher has another tokenizer.

The student samples its own completions; the teacher scores every token of them; the loss is the per-token
generalized JSD between the two next-token distributions over the full vocabulary (`beta`: 0 forward KL, 1 reverse
KL), averaged over the completion tokens, with the gradient through the student only. TRL does the rollouts (HF
generate, or vLLM with `use_vllm`), the chunked divergence and the logging (`loss` is the divergence;
`completions/mean_length`).

That divergence compares the two distributions token id by token id, so it needs the student's tokenizer in the
teacher. TRL checks only that the vocabulary sizes agree, and a teacher whose ids mean other tokens (or whose
end-of-turn is another token) would train on silent garbage, so this step compares the vocabularies and the special
tokens itself. A teacher that differs in any of them (another model family) is, with `cross_tokenizer: true` (the
default), trained from with TRL's GOLD (General Online Logit Distillation, `trl.experimental.gold`): each rollout is
decoded to text and re-tokenized with the teacher's tokenizer, the two tokenizations are aligned on byte offsets (both
ByteLevel BPE; else by position, as the original ULD), and the loss is GOLD's hybrid ULD loss: `matched_weight` times
the generalized JSD (`beta`) over the tokens both vocabularies hold (the same string), plus 1 - `matched_weight` times
ULD's L1 distance between the sorted probabilities of the tokens they do not share (logged: `matched_loss`,
`unmatched_loss`). The teacher reads the student's rendered prompt as text (its own chat template is not applied:
GOLD's design). `cross_tokenizer: false` refuses such a teacher instead, naming both models and the differences;
distil from its samples then (sample -> verify -> select -> sft).

A served teacher (`teacher: {base_url, model}`, a vLLM OpenAI-compatible server) never loads in the training
process: TRL's ServerDistillationTrainer asks the server for the teacher's log-probs of each rollout (vLLM
`prompt_logprobs`) and the loss is over the teacher's top-K tokens plus a tail bucket on each side (beta 0: forward KL
over top K; beta above 0: TRL's top-1 support). See `pipeline.training.served_teacher` for what it needs (the student's
tokenizer, checked through the server's /tokenize; temperature 1).

Input: rows with `prompt` (chat messages or text, e.g. opsd data) or problems (`problem`, rendered with
`prompt_template`). Prompts longer than `max_length - max_tokens` tokens are dropped and counted, never cut.
With `monitor:` (the teacher-hacking monitor, `pipeline.training.monitor`) the rows of `holdout` problems (`id`,
`answer`) are not trained on; every `every` steps the student's pass rate on them and the training divergence are
logged (`monitor/*`), and the stats get `monitor` and `monitor_holdout_rows`.
Output: as `sft`: a LoRA adapter (for `merge`) or, with `lora: null`, the full model.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from pipeline.core.errors import UserError
from pipeline.text.prompts import render_prompt
from pipeline.training.build import load_tokenizer, model_card, peft_config, train_and_save
from pipeline.training.launch import train_here_or_launch
from pipeline.training.monitor import MonitorSettings
from pipeline.training.rollouts import RolloutConfig, prompt_with_think_prefix, rollout_arguments, rollouts_fact
from pipeline.training.served_teacher import ServedTeacher, check_settings

# Special tokens that must be the same in both tokenizers (pad is left out: the step picks its own).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token")


class Config(RolloutConfig):
    input: str = Field(description="Name of the step whose prompts are trained on: rows with `prompt` (chat "
                                   "messages or text) or problems (`problem`).")
    teacher: str | ServedTeacher = Field(
        description="Teacher model (builtin:NAME, step:NAME, a local dir or a hub id). With the student's tokenizer "
                    "(vocabulary and special tokens) it trains with TRL's DistillationTrainer; with another one, see "
                    "cross_tokenizer. Or a served teacher, {base_url: http://HOST:PORT/v1, model: NAME, top_k: K}: "
                    "a vLLM OpenAI-compatible server scores the rollouts (TRL's ServerDistillationTrainer, top-K + "
                    "tail; the student's tokenizer and temperature 1 required). The step's key sees only the server "
                    "and the model name, never the weights behind them (as sample's backend openai): restart the "
                    "server with other weights and nothing re-runs; the manifest records what the server reported.")
    beta: float = Field(default=1.0, ge=0.0, le=1.0,
                        description="Divergence: 0 forward KL(teacher||student), 1 reverse KL(student||teacher), "
                                    "in between the generalized JSD (0.5: JSD). A cross-tokenizer teacher: the "
                                    "divergence over the tokens both vocabularies share.")
    cross_tokenizer: bool = Field(
        default=True,
        description="A teacher whose tokenizer differs from the student's (vocabulary or special tokens). true: "
                    "train with TRL's GOLDTrainer (hybrid ULD loss over the two aligned tokenizations); false (or "
                    "off): refuse it (exit code 2), so that every run compares the two models id by id "
                    "(DistillationTrainer).")
    matched_weight: float | None = Field(
        default=0.6, ge=0.0, le=1.0,
        description="Cross-tokenizer teacher: weight of the divergence over the tokens both vocabularies share; the "
                    "L1 distance of the sorted probabilities of the other tokens gets 1 - it (TRL's "
                    "uld_hybrid_matched_weight / _unmatched_weight; 0.6 is TRL's example). null: TRL's adaptive "
                    "weight, the share of the teacher's vocabulary that the student's holds.")

    monitor: MonitorSettings | None = Field(
        default=None, description="The teacher-hacking monitor (pipeline.training.monitor): hold `holdout` problems "
                                  "out of training (the rows need `id` and `answer`) and every `every` steps log the "
                                  "student's pass rate on them beside the training divergence (the logged loss); "
                                  "warn when both fall for `consecutive` checks. No held-out divergence here: the "
                                  "held-out problems have no teacher traces, and the teacher is not run for it.")
    keyed_when_set: ClassVar = ("monitor",)  # added later; its default trains as before

    @model_validator(mode="after")
    def _monitor_in_one_process(self) -> Config:
        if self.monitor is not None and self.num_processes > 1:
            raise ValueError("monitor: the held-out checks run in one process; set num_processes: 1 or drop monitor")
        return self

    def model_refs(self) -> list[str]:
        # a served teacher's weights are the server's business: only its address and name are in the key
        return [self.model, self.teacher] if isinstance(self.teacher, str) else [self.model]

    @model_validator(mode="after")
    def _served_teacher_settings(self) -> Config:
        if isinstance(self.teacher, ServedTeacher):
            check_settings(self.teacher, beta=self.beta, temperature=self.temperature)
        return self

    @property
    def teacher_name(self) -> str:
        """The teacher as the model card and the manifest name it."""
        return self.teacher if isinstance(self.teacher, str) else self.teacher.identity()


def run(cfg: Config, inputs, out):
    return train_here_or_launch(cfg, inputs, out, train)


def train(cfg: Config, inputs, out) -> dict:
    trainer, data_stats = build_trainer(cfg, inputs, out)
    loss_fact = {"GOLDTrainer": f"loss: GOLD hybrid ULD (matched weight {cfg.matched_weight}, "
                                f"{data_stats.get('alignment')} alignment)",
                 "ServerDistillationTrainer": f"loss: generalized JSD over the served teacher's top "
                                              f"{data_stats.get('teacher_top_k')} tokens plus a tail bucket"
                 }.get(data_stats["trl_trainer"], "loss: generalized JSD over the shared vocabulary")
    card = model_card(cfg, out.name, trained="trained by on-policy distillation in", batch_unit=" prompts",
                      facts=[f"student: `{cfg.model}`", f"teacher: `{cfg.teacher_name}` (beta {cfg.beta})", loss_fact,
                             f"prompts: step `{cfg.input}`", rollouts_fact(cfg)])
    stats = train_and_save(trainer, cfg, out, card, chat_template=trainer.own_chat_template,
                           **data_stats)
    divergence = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history
               if "completions/mean_length" in entry]
    result = {**stats, "teacher": cfg.teacher_name, "divergence_first": divergence[0] if divergence else None,
              "divergence_last": divergence[-1] if divergence else None,
              "completion_length_mean": round(sum(lengths) / len(lengths), 2) if lengths else None}
    if getattr(trainer, "monitor", None) is not None:
        result.update(monitor_holdout_rows=trainer.monitor.heldout_rows, monitor=trainer.monitor.summary())
    return result


def build_trainer(cfg: Config, inputs, out):
    """A DistillationTrainer, or for a teacher with another tokenizer a GOLDTrainer (student + frozen teacher) over
    the prompts, and the data stats."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from pipeline.core.models import resolve_model

    set_seed(out.seed)
    model_path = resolve_model(cfg.model, inputs)
    if isinstance(cfg.teacher, ServedTeacher):
        return served_trainer(cfg, inputs, out, model_path)
    teacher_path = resolve_model(cfg.teacher, inputs)
    tokenizer = load_tokenizer(cfg, model_path)
    # The raw tokenizers: load_tokenizer may pick a pad token, which is the step's choice, not the model's.
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    differences = tokenizer_differences(AutoTokenizer.from_pretrained(model_path), teacher_tokenizer)
    if differences and not cfg.cross_tokenizer:
        raise UserError(
            f"onpolicy: teacher {cfg.teacher!r} and student {cfg.model!r} have different tokenizers "
            f"({'; '.join(differences)}, student vs teacher) and cross_tokenizer is false. The divergence compares "
            "their next-token distributions id by id, so they must share one tokenizer: set cross_tokenizer: true "
            "(TRL's GOLD aligns the two tokenizations), pick a teacher of the student's family, or distil from the "
            "teacher's samples (sample -> verify -> select -> sft)"
        )
    think, own_template = prompt_with_think_prefix(tokenizer, cfg)
    rows, dropped, heldout = training_prompts(cfg, inputs, tokenizer, out.seed)
    data_stats = {"rows": len(rows), "dropped_truncated": dropped,
                  "think_prefix": think}

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    teacher.requires_grad_(False)
    # The Trainer leaves the rollouts' tokens uncounted (rollout_arguments): both trainers below count them.
    arguments = {**rollout_arguments(cfg, out), "beta": cfg.beta}
    if differences:
        trainer, alignment = gold_trainer_for(cfg, model, teacher, teacher_path, teacher_tokenizer, tokenizer, rows,
                                              arguments)
        data_stats.update(trl_trainer="GOLDTrainer", alignment=alignment)
    else:
        from trl import DistillationConfig, DistillationTrainer

        # Teacher and student read the same token ids (one tokenizer, checked above), so their prompts are the same.
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=DistillationConfig(**arguments),
                                      train_dataset=rows, processing_class=tokenizer, peft_config=peft_config(cfg.lora))
        data_stats.update(trl_trainer="DistillationTrainer")
    trainer.own_chat_template = own_template  # saved with the model (see `prompt_with_think_prefix`)
    attach_monitor(cfg, trainer, heldout, tokenizer, out.seed)
    return trainer, data_stats


def served_trainer(cfg: Config, inputs, out, model_path: str):
    """A ServerDistillationTrainer for a served teacher (checked: it serves the name, with the student's tokenizer),
    and the data stats, with the server's identity for the manifest."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.training.served_teacher import check_tokenizer, describe_server, served_teacher_trainer

    server = describe_server(cfg.teacher)
    tokenizer = load_tokenizer(cfg, model_path)
    check_tokenizer(cfg.teacher, tokenizer)
    think, own_template = prompt_with_think_prefix(tokenizer, cfg)
    rows, dropped, heldout = training_prompts(cfg, inputs, tokenizer, out.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    trainer = served_teacher_trainer(cfg.teacher, beta=cfg.beta, model=model, tokenizer=tokenizer, rows=rows,
                                     arguments={**rollout_arguments(cfg, out), "beta": cfg.beta},
                                     peft_config=peft_config(cfg.lora))
    trainer.own_chat_template = own_template
    attach_monitor(cfg, trainer, heldout, tokenizer, out.seed)
    data_stats = {"rows": len(rows), "dropped_truncated": dropped,
                  "think_prefix": think, "trl_trainer": "ServerDistillationTrainer", "served_teacher": server,
                  "teacher_top_k": cfg.teacher.loss_top_k(cfg.beta)}
    return trainer, data_stats


def gold_trainer_for(cfg: Config, model, teacher, teacher_path: str, teacher_tokenizer, tokenizer, rows,
                     arguments: dict):
    """`OnpolicyGoldTrainer` (TRL's GOLD) for a teacher with another tokenizer, and how it aligns the two
    tokenizations; `arguments`: the Trainer and rollout arguments."""
    from trl.experimental.gold import GOLDConfig
    from trl.experimental.utils import is_byte_level_tokenizer

    from pipeline.training.onpolicy_trainer import OnpolicyGoldTrainer

    # GOLD aligns tokens on byte offsets only when both tokenizers are ByteLevel BPE (Llama 3, Qwen, SmolLM, ...);
    # TRL asks for the positional alignment of the original ULD otherwise (SentencePiece, slow tokenizers).
    byte_level = all(tok.is_fast and is_byte_level_tokenizer(tok.backend_tokenizer)
                     for tok in (tokenizer, teacher_tokenizer))
    args = GOLDConfig(
        **arguments,
        max_length=cfg.max_length,
        lmbda=1.0,  # every batch is the student's own rollouts: the prompt rows carry no completion to train on
        teacher_tokenizer_name_or_path=teacher_path,
        use_uld_loss=True,
        use_extended_uld=byte_level,
        uld_use_hybrid_loss=True,
        uld_hybrid_matched_weight=cfg.matched_weight,
        uld_hybrid_unmatched_weight=None if cfg.matched_weight is None else 1.0 - cfg.matched_weight,
        # The rollout temperature scales the logits the loss compares, as DistillationTrainer's `temperature` does.
        uld_student_temperature=cfg.temperature,
        uld_teacher_temperature=cfg.temperature,
    )
    # GOLD's dataset needs a completion per prompt; with lmbda 1 every batch is replaced by rollouts before any loss,
    # so an empty one is never trained on. The prompt goes in as text, rendered with the generation prompt (and the
    # think prefix): of chat rows GOLD keeps only the text the prompt shares with the rendered whole conversation,
    # which leaves out a think prefix.
    rendered = rows.map(lambda row: {"prompt": tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                                             tokenize=False),
                                     "completion": ""}, keep_in_memory=True)
    trainer = OnpolicyGoldTrainer(model=model, teacher_model=teacher, args=args, train_dataset=rendered,
                                  processing_class=tokenizer, peft_config=peft_config(cfg.lora))
    return trainer, "byte-offset" if byte_level else "positional"


def tokenizer_differences(student, teacher) -> list[str]:
    """How the teacher's tokenizer differs from the student's in vocabulary or special tokens (empty: the same)."""
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
    return differences


def training_prompts(cfg: Config, inputs, tokenizer, seed: int):
    """The prompts trained on (`prompt_dataset`), how many were dropped as too long, and the rows held out of them
    for the monitor (None without one)."""
    dataset = inputs[cfg.input].dataset()
    heldout = None
    if cfg.monitor is not None:
        from pipeline.training.monitor import split_holdout

        train, heldout = split_holdout(dataset, cfg.monitor, seed=seed, step="onpolicy", source=cfg.input)
        rows = prompt_dataset(train, cfg, tokenizer)
        return rows, len(train) - len(rows), heldout
    rows = prompt_dataset(dataset, cfg, tokenizer)
    return rows, len(dataset) - len(rows), heldout


def attach_monitor(cfg: Config, trainer, heldout, tokenizer, seed: int) -> None:
    """The teacher-hacking monitor on the trainer (as `trainer.monitor`), when the step has one."""
    if heldout is None:
        return
    from pipeline.training.monitor import attach_rollout_monitor

    trainer.monitor = attach_rollout_monitor(trainer, cfg.monitor, heldout, lambda row: row_messages(row, cfg),
                                             tokenizer=tokenizer, seed=seed, step="onpolicy")


def row_messages(row: dict, cfg: Config) -> list[dict]:
    """A row's prompt as chat messages: its `prompt` (messages, or text as one user message), else its `problem`
    rendered with prompt_template."""
    if "prompt" in row:
        return row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    return [{"role": "user", "content": render_prompt(cfg.prompt_template, row)}]


def prompt_dataset(dataset, cfg: Config, tokenizer):
    """Chat-message `prompt` rows that leave room for a rollout of max_tokens within max_length."""
    columns = dataset.column_names
    if "prompt" in columns:
        rows = dataset.select_columns(["prompt"]).map(lambda row: {"prompt": row_messages(row, cfg)},
                                                      keep_in_memory=True)
    elif "problem" in columns:
        rows = dataset.map(lambda row: {"prompt": row_messages(row, cfg)}, remove_columns=columns,
                           keep_in_memory=True)
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
