"""`opsd`: On-Policy Self-Distillation (OPSD, arXiv 2601.18734): one model taught by itself with a privileged context.

The student sees the problem only and samples its own completion (one per prompt). The teacher is the same network
with privileged text in its prompt (a reference solution or a verified trace). Both score the student's tokens, and
the loss is the per-token divergence between their next-token distributions, averaged over each completion; the
teacher forward runs without gradient, so only the student path is trained.

Built on TRL's `trl.experimental.sdft.SDFTTrainer`, which samples the rollouts (HF generate; vLLM colocate or server
with `use_vllm`, where TRL supports it), composes the teacher prompt from `prompt` + `privileged_context` with
`teacher_template`, and holds the teacher:

    teacher: frozen   the weights at the start (TRL's `base`). With LoRA it is the same model with the adapter
                      disabled, so no second copy is held; a full fine-tune loads a frozen copy.
    teacher: ema      an exponential moving average of the student (`ema_rate` per step)
    teacher: live     the current student

`beta` picks the divergence: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), in between the
generalized JSD; over the full vocabulary, the student's top-k tokens, or the sampled token only (`support`).
`pipeline.training.opsd_trainer.OpsdTrainer` adds what TRL lacks: `divergence_cap` caps each vocabulary entry's term
of the full-vocabulary divergence (the paper's final setting: forward KL, cap 0.05), a leak check, and a loss that
never holds the logits of every completion position (long traces). Rollouts are never reused (one pass per batch), so
TRL's importance-sampling correction for stale rollouts is off.

Logged each logging step: `self_distillation/distillation_loss` (the divergence), `completions/mean_length`, and
`opsd/leak_share`: the share of rollouts that copy `leak_ngram` or more consecutive tokens of their privileged text
verbatim (the student should learn to reason, not recite the teacher's hint). The manifest gets the first and last
divergence, the mean completion length and the mean leak share.

Input (`input`), one of:
- opsd data: `prompt` (chat messages or text) and `privileged_context`, used as they are;
- graded samples (a `verify` step): per problem, the first correct completion is the privileged context and the
  prompt it was sampled with is the student's; problems without a correct sample are left out;
- problems, with `context_template` set (e.g. "{solution}"): the privileged text is rendered from the row's columns
  and the student prompt from `prompt_template`.
Rows whose teacher prompt leaves fewer than `max_tokens` tokens of `max_length` are dropped and counted, never cut.

Output: as `sft`: a LoRA adapter (for `merge`) or, with `lora: null`, the full model.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.errors import UserError
from pipeline.core.funnel import Count, FunnelStage, trained_stage
from pipeline.core.models import resolve_model
from pipeline.core.step import require_columns
from pipeline.text.prompts import render_prompt
from pipeline.training.build import load_tokenizer, model_card, peft_config, train_and_save
from pipeline.training.launch import train_here_or_launch
from pipeline.training.rollouts import RolloutConfig, prompt_with_think_prefix, rollout_arguments, rollouts_fact

# The paper's teacher instruction around the reference; the student prompt (with its \boxed{} request) comes first.
DEFAULT_TEACHER_TEMPLATE = (
    "{prompt}\n\nHere is a reference solution to this problem:\n{privileged_context}\n\n"
    "After understanding the reference solution, write your own step-by-step reasoning that reaches the same "
    "final answer."
)
# SDFT's teacher kinds under the names this step uses.
TEACHER_KINDS = {"frozen": "base", "ema": "ema", "live": "live"}
SUPPORTS = {"full": "full_logits", "topk": "topk_logits", "sampled_token": "sampled_token"}
TEACHER_CHECK_FILE = "teacher_check.json"  # scratch: the privileged-teacher check, measured once


class Config(RolloutConfig):
    code_version: ClassVar = "2"  # the loss from chunked hidden states (same value, other rounding)
    dry_run_overrides: ClassVar = {**RolloutConfig.dry_run_overrides, "teacher_check_problems": 2,
                                   "teacher_check_samples": 1}
    input: str = Field(description="Name of the step whose data is trained on: opsd data (prompt, "
                                   "privileged_context), graded samples (a verify step), or problems with "
                                   "context_template set.")
    teacher: Literal["frozen", "ema", "live"] = Field(
        default="frozen",
        description="Teacher weights. frozen: the model at the start (with LoRA: the adapter disabled); ema: a moving "
                    "average of the student; live: the current student.")
    ema_rate: float = Field(default=0.05, gt=0, le=1, description="teacher: ema: weight of the student in each "
                                                                   "step's update of the teacher.")
    beta: float = Field(default=0.0, ge=0.0, le=1.0,
                        description="Divergence: 0 forward KL(teacher||student), 1 reverse KL(student||teacher), "
                                    "in between the generalized JSD (paper code: 0.5; final paper: 0).")
    support: Literal["full", "topk", "sampled_token"] = Field(
        default="full",
        description="Tokens the divergence runs over at each position: full vocabulary, the student's top-k "
                    "(renormalised), or the sampled token only (reverse KL, beta: 1).")
    topk: int = Field(default=100, ge=1, description="support: topk: how many of the student's top tokens.")
    divergence_cap: float | None = Field(
        default=None, gt=0,
        description="Cap on each vocabulary entry's term of the full-vocabulary divergence (paper: 0.05 with "
                    "forward KL); null: no cap. Needs support: full.")
    context_template: str | None = Field(
        default=None,
        description="Privileged text from a problems row's columns, e.g. '{solution}'; set it to train on problems "
                    "with a reference column instead of opsd data or graded samples.")
    teacher_template: str = Field(
        default=DEFAULT_TEACHER_TEMPLATE,
        description="Teacher's user message: {prompt} (the student's user message) and {privileged_context}; "
                    "write other braces doubled ({{ }}).")
    leak_ngram: int = Field(default=20, ge=1,
                            description="Leak check: a rollout that shares this many consecutive tokens with its "
                                        "privileged text counts as copying it (logged as opsd/leak_share).")
    teacher_check_problems: int = Field(
        default=16, ge=0,
        description="Before training, on this many rows with an answer (seeded), measure whether the model shown the "
                    "privileged context is a better teacher than the student: pass rate sampling with and without it, "
                    "and the NLL per token of the student's verified traces with and without it "
                    "(pipeline.training.privileged_teacher); in the manifest as teacher_check, with a warning when it "
                    "is no better. 0: skip.")
    teacher_check_samples: int = Field(default=4, ge=1,
                                       description="Completions per problem and prompt in the teacher check.")

    @field_validator("teacher_template")
    @classmethod
    def _teacher_template_formats(cls, template: str) -> str:
        try:
            template.format(prompt="", privileged_context="")  # TRL fills it with str.format
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"teacher_template takes only {{prompt}} and {{privileged_context}} (double other "
                             f"braces): {e!r}") from None
        if "{prompt}" not in template or "{privileged_context}" not in template:
            raise ValueError("teacher_template must contain {prompt} and {privileged_context}")
        return template

    @model_validator(mode="after")
    def _options_fit(self):
        if self.divergence_cap is not None and self.support != "full":
            raise ValueError(f"divergence_cap caps full-vocabulary terms; it needs support: full (is {self.support})")
        if self.support == "sampled_token" and self.beta != 1.0:
            raise ValueError("support: sampled_token is reverse KL only; set beta: 1")
        return self


def funnel_stage(stats: dict) -> FunnelStage:
    """The run page's data funnel: a training step's rows, and the problems without a verified trace to show."""
    return trained_stage(stats, Count("problems_without_context", "problems without a verified trace (opsd)",
                                      stats.get("problems_without_context", 0)))


def run(cfg: Config, inputs, out):
    model_path = resolve_model(cfg.model, inputs)
    if (Path(model_path) / "adapter_config.json").exists():
        raise UserError(f"opsd: model {cfg.model!r} is a LoRA adapter; merge it first (a merge step) and give the "
                        "merged model, so the frozen teacher is well defined")
    check = teacher_check(cfg, inputs, out, model_path) if cfg.teacher_check_problems else None
    model = train_here_or_launch(cfg, inputs, out, train)
    if check is not None:
        model.stats["teacher_check"] = check
    return model


def teacher_check(cfg: Config, inputs, out, model_path: str) -> dict:
    """`pipeline.training.privileged_teacher`'s check of the model before training, once (kept in the scratch dir, so a
    resumed run does not sample again); warns on the terminal when the teacher is no better than the student."""
    import gc
    import json

    import torch

    from pipeline.core.compute_dtype import choose
    from pipeline.core.console import user_console
    from pipeline.training import privileged_teacher
    from pipeline.training.template_check import teacher_prompt
    from pipeline.training.token_logprobs import load_scoring_model

    saved = out.scratch / TEACHER_CHECK_FILE
    if saved.exists():
        return json.loads(saved.read_text())
    rows, _ = opsd_dataset(inputs[cfg.input].dataset(), cfg, cfg.input)
    if "answer" not in rows.column_names:
        check = {"skipped": f"dataset {cfg.input!r} has no answer column to grade samples against"}
    else:
        picked = privileged_teacher.slice_of(rows["answer"], cfg.teacher_check_problems, out.seed)
        if not picked:
            check = {"skipped": f"no row of dataset {cfg.input!r} has an answer"}
        else:
            rows = rows.select(picked)
            tokenizer = load_tokenizer(cfg, model_path)
            prompt_with_think_prefix(tokenizer, cfg)  # the prompts the rollouts get
            model = load_scoring_model(model_path, who="opsd: model", dtype=choose(cfg.dtype).dtype)
            check = privileged_teacher.measure(
                model, tokenizer, [list(prompt) for prompt in rows["prompt"]],
                [teacher_prompt(list(row["prompt"]), row["privileged_context"], cfg.teacher_template) for row in rows],
                [str(answer) for answer in rows["answer"]], samples=cfg.teacher_check_samples,
                max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                batch_size=cfg.batch_size, seed=out.seed)
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if not check["teacher_better"]:
                user_console().print(f"[yellow]warning: opsd: the privileged teacher is no better than the student "
                                     f"on {check['problems']} problems: {check['why']}; OPSD would pull the student "
                                     "toward it (see teacher_check in the manifest)", markup=True)
    out.scratch.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(check))
    return check


def train(cfg: Config, inputs, out) -> dict:
    """Train in this process (every process of a distributed launch runs it); returns the manifest stats."""
    trainer, data_stats = build_trainer(cfg, inputs, out)
    teacher = f"teacher: {cfg.teacher}, beta {cfg.beta}, support {cfg.support}, cap {cfg.divergence_cap}"
    card = model_card(cfg, out.name, trained="trained by on-policy self-distillation (OPSD) in", batch_unit=" prompts",
                      facts=[f"base model: `{cfg.model}`", f"training data: step `{cfg.input}`", teacher,
                             rollouts_fact(cfg)])
    stats = train_and_save(trainer, cfg, out, card, chat_template=trainer.own_chat_template,
                           **data_stats)
    return {**stats, **logged_stats(trainer.state.log_history)}


def build_trainer(cfg: Config, inputs, out):
    """An OpsdTrainer over the opsd rows, and the data stats (rows, dropped rows)."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed
    from trl.experimental.sdft import SDFTConfig

    from pipeline.training.opsd_trainer import OpsdTrainer

    set_seed(out.seed)  # before the model exists: LoRA's initial weights come from it
    model_path = resolve_model(cfg.model, inputs)
    tokenizer = load_tokenizer(cfg, model_path)
    think, own_template = prompt_with_think_prefix(tokenizer, cfg)
    rows, data_stats = opsd_dataset(inputs[cfg.input].dataset(), cfg, cfg.input)
    rows = rows.select_columns(["prompt", "privileged_context"])  # the answers are the teacher check's
    data_stats.update(template_check_rows(rows, cfg, tokenizer), think_prefix=think)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    args = SDFTConfig(
        **rollout_arguments(cfg, out),
        max_prompt_length=cfg.max_length - cfg.max_tokens,
        num_generations=1,  # OPSD: one rollout per prompt
        teacher_model_kind=TEACHER_KINDS[cfg.teacher],
        teacher_update_rate=cfg.ema_rate,
        distillation_mode=SUPPORTS[cfg.support],
        distillation_alpha=cfg.beta,
        distillation_topk=cfg.topk,
        distillation_is_clip=None,  # rollouts are trained on once, by the policy that sampled them
        teacher_prompt_template=cfg.teacher_template,
    )
    trainer = OpsdTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                          peft_config=peft_config(cfg.lora), divergence_cap=cfg.divergence_cap,
                          leak_ngram=cfg.leak_ngram)
    # The teacher prompt is the longest; TRL would cut it from the left (losing the problem), so drop instead.
    trainer.train_dataset = drop_overlong_teacher_prompts(trainer, rows, cfg)
    trainer.own_chat_template = own_template  # saved with the model (see `prompt_with_think_prefix`)
    data_stats["dropped_truncated"] = len(rows) - len(trainer.train_dataset)
    data_stats["rows"] = len(trainer.train_dataset)
    return trainer, data_stats


def template_check(cfg: Config, inputs, tokenizer) -> dict:
    """The teacher's prompt of every row renders as the student's but for the privileged context
    (`pipeline.training.template_check`), with the think prefix the rollouts get."""
    prompt_with_think_prefix(tokenizer, cfg)
    return template_check_rows(opsd_dataset(inputs[cfg.input].dataset(), cfg, cfg.input)[0], cfg, tokenizer)


def template_check_rows(rows, cfg: Config, tokenizer) -> dict:
    from pipeline.training.template_check import check_teacher_prompts, teacher_prompt

    pairs = ((f"row {i}", row["prompt"], teacher_prompt(row["prompt"], row["privileged_context"], cfg.teacher_template))
             for i, row in enumerate(rows))
    return check_teacher_prompts(tokenizer, pairs, step=cfg.uses, dataset=cfg.input, model_ref=cfg.model)


def opsd_dataset(dataset, cfg: Config, dataset_name: str):
    """(`prompt` chat messages, `privileged_context`) rows from any of the three accepted inputs, and data stats."""
    columns = dataset.column_names
    if cfg.context_template is not None:
        require_columns(dataset, ["problem"], step="opsd", source=dataset_name, reads="problems with context_template")

        def from_problem(row):
            return {"prompt": [{"role": "user", "content": render_prompt(cfg.prompt_template, row)}],
                    "privileged_context": render_prompt(cfg.context_template, row),
                    **({"answer": row["answer"]} if "answer" in row else {})}

        rows = dataset.map(from_problem, remove_columns=columns, keep_in_memory=True)
        stats = {"context_from": "template"}
    elif "privileged_context" in columns:
        require_columns(dataset, ["prompt"], step="opsd", source=dataset_name, reads="opsd data")
        rows = dataset.select_columns([c for c in ("prompt", "privileged_context", "answer") if c in columns]).map(
            lambda row: {"prompt": row["prompt"] if isinstance(row["prompt"], list)
                         else [{"role": "user", "content": row["prompt"]}]}, keep_in_memory=True)
        stats = {"context_from": "column"}
    elif "correct" in columns:
        require_columns(dataset, ["id", "prompt", "completion", "sample_idx", "answer"], step="opsd",
                        source=dataset_name, reads="graded samples such as a verify step writes")
        rows, stats = first_verified_traces(dataset)
    else:
        raise UserError(f"opsd: dataset of step {dataset_name!r} has no privileged text: give opsd data (prompt, "
                        "privileged_context), graded samples (a verify step), or set context_template (e.g. "
                        f"'{{solution}}') to render it from problem columns (it has {', '.join(columns)})")
    empty = [i for i, text in enumerate(rows["privileged_context"]) if not str(text or "").strip()]
    if empty:
        raise UserError(f"opsd: row {empty[0]} of dataset {dataset_name!r} has an empty privileged_context "
                        f"({len(empty)} such rows)")
    if len(rows) == 0:
        raise UserError(f"opsd: dataset of step {dataset_name!r} gives no rows to train on")
    return rows, stats


def first_verified_traces(graded):
    """Per problem, its lowest-sample_idx correct completion as the privileged context of the prompt it answered."""
    from datasets import Dataset

    columns = graded.select_columns(["id", "prompt", "completion", "correct", "sample_idx", "answer"]).to_dict()
    chosen: dict[str, int] = {}
    for i, (problem_id, correct) in enumerate(zip(columns["id"], columns["correct"])):
        earlier = problem_id in chosen and columns["sample_idx"][chosen[problem_id]] <= columns["sample_idx"][i]
        if correct and not earlier:
            chosen[problem_id] = i
    problems = len(set(columns["id"]))
    rows = Dataset.from_dict({
        "prompt": [columns["prompt"][i] for i in chosen.values()],
        "privileged_context": [columns["completion"][i] for i in chosen.values()],
        "answer": [columns["answer"][i] for i in chosen.values()],
    })
    return rows, {"context_from": "verified", "problems_without_context": problems - len(chosen)}


def drop_overlong_teacher_prompts(trainer, rows, cfg: Config):
    limit = cfg.max_length - cfg.max_tokens
    builder, tokenizer = trainer.teacher_context_builder, trainer.processing_class

    def fits(row) -> bool:
        teacher_prompt = builder.select_generation_prompts([row["prompt"]], [row["privileged_context"]])[0]
        return len(tokenizer.apply_chat_template(teacher_prompt, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]) <= limit

    kept = rows.filter(fits, keep_in_memory=True, desc="opsd: dropping rows over max_length")
    if len(kept) == 0:
        raise UserError(f"opsd: every teacher prompt of dataset {cfg.input!r} is longer than max_length - max_tokens "
                        f"= {limit} tokens; raise max_length")
    return kept


def logged_stats(log_history: list[dict]) -> dict:
    """Manifest stats from the training log: first and last divergence, mean completion length and leak share."""
    def logged(key):
        return [entry[key] for entry in log_history if entry.get(key) is not None]

    def mean(values):
        return round(sum(values) / len(values), 4) if values else None

    divergence = logged("self_distillation/distillation_loss")
    return dict(divergence_first=divergence[0] if divergence else None,
                divergence_last=divergence[-1] if divergence else None,
                completion_length_mean=mean(logged("completions/mean_length")),
                leak_share=mean(logged("opsd/leak_share")))
