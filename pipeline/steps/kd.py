"""`kd`: logit-level distillation from stored teacher distributions (the top-K columns `score` writes), full or LoRA.

The loss (`pipeline.training.kd_loss`): at every completion token, forward KL from the teacher's top-K distribution
plus one tail bucket (1 - sum of the top K) to the student's distribution over the same K + 1 buckets, at
`temperature` (times temperature^2), plus `nll_weight` times the NLL of the completion token itself. `objective:
taid` distils towards TAID's interpolation of the detached student and the teacher (arXiv 2501.16937), whose t moves
from `taid_t_start` to `taid_t_end` by the paper's adaptive update (the equations are in the loss module's
docstring). The student's full-vocabulary logits exist for a chunk of positions at a time, never the whole sequence.

Trained by `pipeline.training.kd_trainer.KdTrainer` (TRL's SFTTrainer, its `compute_loss` replaced) on the rows'
stored token ids: the teacher's prompt and completion tokens, as scored. The student must share the teacher's token
table (`pipeline.text.teacher_logprobs.tokenizer_identity`, recorded in the data): a student whose tokenizer differs
is refused, naming both (a cross-tokenizer teacher is `onpolicy`'s GOLD). Rows longer than `max_length` tokens are
dropped and counted, never cut. `packing: true` puts several rows in each max_length sequence
(`pipeline.training.kd_packing`: TRL's best-fit decreasing; position_ids restart at each row, so attention and the
labels stay within each row; stats `packed_sequences`).

Logged each logging step: `kd/loss_per_token` and, with TAID, `kd/taid_t`.
With `monitor:` (the teacher-hacking monitor, `pipeline.training.monitor`), the rows of `holdout` problems are not
trained on; every `every` steps `monitor/pass_rate`, `monitor/heldout_divergence` and `monitor/train_divergence` are
logged too, and the stats get `monitor` (the checks, the alarm, the power-law fit) and `monitor_holdout_rows`.

Output: with LoRA, the adapter (peft dir) + tokenizer, stats `adapter: true` and `base_model`; with `lora: null`, the
full model. Either way the manifest records the teacher's tokenizer identity and K.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.errors import UserError
from pipeline.training.build import load_tokenizer, model_card, peft_config, train_and_save, training_arguments
from pipeline.training.config import LoraSettings, TrainingConfig, no_adapter_on_the_head
from pipeline.training.launch import train_here_or_launch
from pipeline.training.monitor import MonitorSettings


class Config(TrainingConfig):
    input: str = Field(description="Name of the step whose rows hold the teacher's stored distributions (a score "
                                   "step, or a step that keeps its columns).")
    objective: Literal["kd", "taid"] = Field(
        default="kd", description="kd: forward KL to the teacher's top-K + tail. taid: to TAID's interpolation of the "
                                  "detached student and the teacher, t adapted from taid_t_start to taid_t_end.")
    temperature: float = Field(default=1.0, gt=0, description="Softening temperature of both distributions; the KL "
                                                             "is multiplied by temperature^2. Exact at 1.")
    nll_weight: float = Field(default=0.0, ge=0, description="Weight of the completion tokens' NLL added to the KL "
                                                            "(0: pure distillation).")
    taid_t_start: float = Field(default=0.4, ge=0, le=1, description="objective taid: t at the start (paper: 0.4).")
    taid_t_end: float = Field(default=1.0, ge=0, le=1, description="objective taid: t at the end (paper: 1.0).")
    taid_alpha: float = Field(default=5e-4, ge=0, le=1, description="objective taid: step size of t's adaptive "
                                                                    "update (paper: 5e-4).")
    taid_beta: float = Field(default=0.99, ge=0, lt=1, description="objective taid: momentum of the objective's "
                                                                   "relative change (paper: 0.99).")
    packing: bool = Field(
        default=False, description="Pack several rows into each max_length sequence (TRL best-fit decreasing, no row "
                                   "is cut); position ids restart at each row, so attention stays within it.")
    keyed_when_set: ClassVar = ("packing", "monitor")  # added later; their defaults train as before
    one_sequence_at_a_time: bool = Field(
        default=False, description="Run each sequence of a batch through the model on its own inside activation "
                                   "checkpointing: backward holds one sequence's activations, for one more forward.")

    monitor: MonitorSettings | None = Field(
        default=None, description="The teacher-hacking monitor (pipeline.training.monitor): hold `holdout` problems "
                                  "out of training (the rows need `id` and `answer`) and every `every` steps log the "
                                  "student's pass rate on them, its divergence on their stored teacher distributions "
                                  "and the training divergence; warn when both fall for `consecutive` checks.")

    @model_validator(mode="after")
    def _monitor_in_one_process(self) -> Config:
        if self.monitor is not None and self.num_processes > 1:
            raise ValueError("monitor: the held-out checks run in one process; set num_processes: 1 or drop monitor")
        return self

    @model_validator(mode="after")
    def _taid_range(self) -> Config:
        if self.taid_t_start > self.taid_t_end:
            raise ValueError(f"taid_t_start ({self.taid_t_start}) must not exceed taid_t_end ({self.taid_t_end})")
        return self

    @field_validator("lora")
    @classmethod
    def _no_adapter_on_the_head(cls, lora: LoraSettings | None) -> LoraSettings | None:
        return no_adapter_on_the_head(lora, "kd")


def run(cfg: Config, inputs, out):
    return train_here_or_launch(cfg, inputs, out, train)


def train(cfg: Config, inputs, out) -> dict:
    trainer, stats = build_trainer(cfg, inputs, out)
    method = "TAID" if cfg.objective == "taid" else "top-K logit distillation"
    card = model_card(cfg, out.name, trained=f"by {method} in",
                      facts=[f"base model: `{cfg.model}`", (f"teacher distributions: step `{cfg.input}` "
                             f"(top-{stats['k']}, teacher tokenizer `{stats['teacher_tokenizer']}`)")])
    result = train_and_save(trainer, cfg, out, card, **stats)
    if trainer.taid is not None:
        result["taid_t_final"] = round(trainer.taid.t, 6)
    if getattr(trainer, "monitor", None) is not None:
        result.update(monitor_holdout_rows=trainer.monitor.heldout_rows, monitor=trainer.monitor.summary())
    return result


def build_trainer(cfg: Config, inputs, out):
    """A KdTrainer over the stored distributions, and the stats (rows, dropped_truncated, k, teacher_tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig

    from pipeline.core.models import resolve_model
    from pipeline.text import teacher_logprobs as stored
    from pipeline.training.kd_loss import TaidSchedule
    from pipeline.training.kd_packing import check_attention, pack_rows
    from pipeline.training.kd_trainer import KdCollator, KdTrainer
    from pipeline.training.monitor import attach_kd_monitor, split_holdout

    set_seed(out.seed)
    model_path = resolve_model(cfg.model, inputs)
    tokenizer = load_tokenizer(cfg, model_path)
    dataset = inputs[cfg.input].dataset()
    k, teacher = stored.check_dataset(dataset, step="kd", source=cfg.input)
    student = stored.tokenizer_identity(tokenizer, cfg.model)
    if not stored.same_vocabulary(teacher, student):
        raise UserError(f"kd: the student {student!r} does not share the teacher's tokenizer {teacher!r} (recorded in "
                        f"dataset {cfg.input!r}): the stored token ids would mean other tokens; score the data with a "
                        "teacher of the student's tokenizer, or use onpolicy's cross-tokenizer (GOLD) distillation")
    heldout = None
    if cfg.monitor is not None:  # the held-out problems' rows leave the training data
        dataset, heldout = split_holdout(dataset, cfg.monitor, seed=out.seed, step="kd", source=cfg.input)
    rows = training_rows(dataset, cfg)
    train_data = pack_rows(rows, cfg.max_length, k) if cfg.packing else rows
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if cfg.packing:
        check_attention(model)

    args = SFTConfig(**training_arguments(cfg, out), max_length=None, remove_unused_columns=False,
                     dataset_kwargs={"skip_prepare_dataset": True})
    taid = None
    if cfg.objective == "taid":
        total = cfg.max_steps or max(1, int(cfg.epochs * -(-len(train_data) // (
            cfg.batch_size * cfg.gradient_accumulation_steps * cfg.num_processes))))
        taid = TaidSchedule(total, t_start=cfg.taid_t_start, t_end=cfg.taid_t_end, alpha=cfg.taid_alpha,
                            beta=cfg.taid_beta)
    trainer = KdTrainer(model=model, args=args, train_dataset=train_data, processing_class=tokenizer,
                        peft_config=peft_config(cfg.lora), data_collator=KdCollator(tokenizer.pad_token_id, k),
                        temperature=cfg.temperature, nll_weight=cfg.nll_weight, taid=taid,
                        one_sequence_at_a_time=cfg.one_sequence_at_a_time)
    packed = {"packed_sequences": len(train_data)} if cfg.packing else {}
    if heldout is not None:
        trainer.monitor = attach_kd_monitor(trainer, cfg.monitor, heldout, training_rows(heldout, cfg),
                                            tokenizer=tokenizer, k=k, seed=out.seed)
    return trainer, {"rows": len(rows), "dropped_truncated": len(dataset) - len(rows), "k": k,
                     "teacher_tokenizer": teacher, "objective": cfg.objective, **packed}


def training_rows(dataset, cfg: Config):
    """input_ids (prompt + completion), completion_start and the teacher's top-K per completion token, for the rows
    of at most max_length tokens."""
    from pipeline.text import teacher_logprobs as stored

    def to_row(row):
        prompt, completion = row[stored.PROMPT_IDS], row[stored.COMPLETION_IDS]
        return {"input_ids": prompt + completion, "completion_start": len(prompt)}

    columns = [stored.PROMPT_IDS, stored.COMPLETION_IDS, stored.TOPK_IDS, stored.TOPK_LOGPROBS]
    rows = dataset.select_columns(columns).filter(
        lambda row: 0 < len(row[stored.PROMPT_IDS]) and len(row[stored.PROMPT_IDS]) + len(row[stored.COMPLETION_IDS])
        <= cfg.max_length, keep_in_memory=True)
    if len(rows) == 0:
        raise UserError(f"kd: every row of dataset {cfg.input!r} is longer than max_length={cfg.max_length} tokens "
                        "(prompt + completion) or has no prompt; raise max_length")
    # In memory: otherwise the maps would write cache files into the input step's finished data dir.
    return rows.map(to_row, remove_columns=[stored.PROMPT_IDS, stored.COMPLETION_IDS], keep_in_memory=True)
