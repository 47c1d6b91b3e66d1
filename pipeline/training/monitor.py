"""The teacher-hacking monitor of the `kd` and `onpolicy` steps: `MonitorSettings` (a step's `monitor:`), the held-out
slice of problems (`split_holdout`), the checks a trainer callback runs on it (`monitor_callback`), and the two pure
diagnostics over the checks, `teacher_hacking` and `power_law_departure`.

Teacher hacking (Tiapkin et al., "On Teacher Hacking in Language Model Distillation", arXiv 2502.02671): distilled
from a fixed, offline set of teacher outputs, the student goes on getting closer to the teacher on that set (the
proxy: the training divergence falls) while it gets worse at the task the teacher stands for (the golden metric).
The paper measures the golden metric against an oracle model; here it is the student's pass rate, graded with our
grader (`eval.grading_pool.grade_many`), on problems held out of the training data.

Each check (every `every` optimizer steps and after the last) records, at its step:
- `pass_rate`: the student (the model in training, eval mode, no gradient, `n` samples per held-out problem: greedy
  at n = 1, else at `temperature`; HF generate over left-padded batches, its random state forked and seeded so the
  training's is untouched) graded against the held-out problems' `answer`;
- `heldout_divergence`: the training loss itself (the trainer's `compute_loss`, eval mode, no gradient) over the
  held-out rows' stored teacher distributions, per completion token (kd only: onpolicy has no stored teacher);
- `train_divergence`: the mean training divergence per optimizer step since the check before (kd: its logged
  `kd/loss_per_token`; onpolicy: its training `loss`, the divergence to the teacher).
They go into the trainer's log as `monitor/pass_rate`, `monitor/heldout_divergence` and `monitor/train_divergence`
(so into log_history.json, the trackers and the run page), and the step's manifest stats get `monitor: {checks,
teacher_hacking, power_law}` (`Monitor.summary`).

The alarm (`teacher_hacking`): a check "falls" when its training divergence is lower than the check's before it AND
its held-out pass rate is lower than the check's before it, both strictly; M = `consecutive` falling checks in a row
raise the alarm at the M-th, once: a console warning with the numbers and the remedies.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.errors import UserError

PREFIX = "monitor/"
PASS_RATE, HELDOUT_DIVERGENCE, TRAIN_DIVERGENCE = "pass_rate", "heldout_divergence", "train_divergence"
MEASURES = (PASS_RATE, HELDOUT_DIVERGENCE, TRAIN_DIVERGENCE)
REMEDIES = ("more prompts (load's `limit`, or a bigger dataset), several completions per prompt (sample's `n`), "
            "online generation (the `onpolicy` step instead of `kd`)")
GRADING_TIMEOUT_S = 10.0  # per completion, as the verify step's default


class MonitorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    holdout: int = Field(default=32, ge=1, description="Problems held out of the training data (a seeded shuffle of "
                                                       "the distinct `id`s): their rows are not trained on.")
    every: int = Field(default=50, ge=1, description="Optimizer steps between two checks (one more after the last "
                                                     "step).")
    consecutive: int = Field(default=3, ge=1, description="M: checks in a row whose training divergence AND "
                                                          "held-out pass rate both fell that raise the alarm.")
    max_tokens: int = Field(default=256, ge=1, description="New tokens the student may generate per held-out "
                                                           "problem for its pass rate.")
    n: int = Field(default=1, ge=1, description="Samples per held-out problem: 1 is greedy, more are sampled at "
                                                "`temperature`.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of the pass rate when n > 1.")
    power_law_warmup: int = Field(default=4, ge=2, description="Checks the power law of the training divergence "
                                                               "is fitted on (log divergence = a + b log step).")
    power_law_tolerance: float = Field(default=0.1, gt=0, description="Relative departure from the fitted power "
                                                                      "law that counts (0.1: 10%).")


# ---- the held-out slice ------------------------------------------------------------------------------------------


def split_holdout(dataset, settings: MonitorSettings, *, seed: int, step: str, source: str):
    """(training rows, held-out rows) of `dataset`: every row of `settings.holdout` problems, drawn by shuffling the
    distinct ids with `seed`, is held out. The rows need `id` and `answer` (the held-out pass rate grades against
    it)."""
    missing = [column for column in ("id", "answer") if column not in dataset.column_names]
    if missing:
        raise UserError(f"{step}: monitor needs column(s) {', '.join(missing)} in dataset {source!r} (the held-out "
                        f"problems' ids and gold answers; it has {', '.join(dataset.column_names)})")
    ids = [str(i) for i in dataset["id"]]
    problems = sorted(set(ids))
    if settings.holdout >= len(problems):
        raise UserError(f"{step}: monitor.holdout is {settings.holdout} but dataset {source!r} has "
                        f"{len(problems)} problems (distinct ids): nothing would be left to train on")
    random.Random(seed).shuffle(problems)
    held = set(problems[:settings.holdout])
    train = [i for i, problem in enumerate(ids) if problem not in held]
    heldout = [i for i, problem in enumerate(ids) if problem in held]
    return dataset.select(train, keep_in_memory=True), dataset.select(heldout, keep_in_memory=True)


def first_row_per_problem(ids: Sequence, answers: Sequence) -> list[int]:
    """Index of each problem's first row (the pass rate asks each problem once, whatever its row count)."""
    seen: dict[str, int] = {}
    for index, problem in enumerate(ids):
        seen.setdefault(str(problem), index)
    missing = [problem for problem, index in seen.items() if answers[index] is None or not str(answers[index]).strip()]
    if missing:
        raise UserError(f"monitor: held-out problem(s) {', '.join(map(repr, missing[:5]))} have no answer to grade "
                        "against")
    return sorted(seen.values())


# ---- the diagnostics (pure) ---------------------------------------------------------------------------------------


def teacher_hacking(checks: Sequence[dict], consecutive: int) -> dict | None:
    """The alarm over checks [{step, pass_rate, train_divergence}, ...] in step order: None, or, at the first check
    that ends `consecutive` checks in a row whose training divergence fell AND whose pass rate fell (each strictly
    below the check's before it), {suspected: true, step, from_step, train_divergence: [before, at step],
    pass_rate: [before, at step], consecutive}. A check missing either number breaks a run."""
    run = 0
    for index in range(1, len(checks)):
        before, now = checks[index - 1], checks[index]
        numbers = [before.get(TRAIN_DIVERGENCE), now.get(TRAIN_DIVERGENCE), before.get(PASS_RATE), now.get(PASS_RATE)]
        falling = None not in numbers and now[TRAIN_DIVERGENCE] < before[TRAIN_DIVERGENCE] and \
            now[PASS_RATE] < before[PASS_RATE]
        run = run + 1 if falling else 0
        if run == consecutive:
            start = checks[index - consecutive]
            return {"suspected": True, "step": now["step"], "from_step": start["step"],
                    TRAIN_DIVERGENCE: [start[TRAIN_DIVERGENCE], now[TRAIN_DIVERGENCE]],
                    PASS_RATE: [start[PASS_RATE], now[PASS_RATE]], "consecutive": consecutive}
    return None


def power_law_departure(steps: Sequence[float], proxy: Sequence[float], warmup: int, tolerance: float) -> dict | None:
    """The paper's oracle-free diagnostic (arXiv 2502.02671: with clean data the proxy, the student's divergence to
    the teacher, keeps to a polynomial convergence law; teacher hacking shows as a departure from it), as done here:
    fit log proxy = a + b log step by least squares on the first `warmup` (step, proxy) points, then report the first
    later point whose proxy differs from the fit's exp(a + b log step) by more than `tolerance` relative to it.

    None when there are fewer than `warmup` points with step > 0 and proxy > 0 (no fit); else {a, b, fitted_on,
    departed} and, when departed, the point's step, proxy, predicted and relative departure (signed: below the fit
    is negative)."""
    points = [(float(s), float(p)) for s, p in zip(steps, proxy)
              if s is not None and p is not None and s > 0 and p > 0 and math.isfinite(p)]
    if len(points) < warmup or len({s for s, _ in points[:warmup]}) < 2:
        return None
    xs, ys = [math.log(s) for s, _ in points[:warmup]], [math.log(p) for _, p in points[:warmup]]
    mean_x, mean_y = sum(xs) / warmup, sum(ys) / warmup
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    a = mean_y - b * mean_x
    result = {"a": round(a, 6), "b": round(b, 6), "fitted_on": warmup, "departed": False}
    for step, value in points[warmup:]:
        predicted = math.exp(a + b * math.log(step))
        relative = (value - predicted) / predicted
        if abs(relative) > tolerance:
            return {**result, "departed": True, "step": int(step) if step.is_integer() else step, "proxy": value,
                    "predicted": round(predicted, 6), "relative": round(relative, 4)}
    return result


def alarm_text(alarm: dict) -> str:
    """The console's (and the run page's) sentence for a `teacher_hacking` result."""
    (x, y), (a, b) = alarm[TRAIN_DIVERGENCE], alarm[PASS_RATE]
    return (f"teacher hacking suspected at step {alarm['step']}: training divergence {x:.4g} -> {y:.4g} while "
            f"held-out pass rate {a:.3g} -> {b:.3g} over {alarm['consecutive']} checks; remedies: {REMEDIES}")


# ---- measuring --------------------------------------------------------------------------------------------------


def pass_rate(model, tokenizer, prompts: list[list[int]], answers: list[str], settings: MonitorSettings, *,
              batch_size: int, seed: int) -> float:
    """Mean over the problems of the share of their `settings.n` completions graded correct against their answer.
    `prompts` are token ids (the chat template already rendered); the caller has put the model in eval mode."""
    import torch

    from eval.grading_pool import grade_many

    device = next(model.parameters()).device
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops]) | {tokenizer.eos_token_id}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": 1.0, "top_k": 0} if settings.n > 1 \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    texts, finishes = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)  # the same draws at every check: the pass rate moves with the model only
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            longest = max(map(len, batch))
            input_ids = torch.tensor([[pad] * (longest - len(ids)) + list(ids) for ids in batch], device=device)
            attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in batch],
                                          device=device)
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=pad,
                                       max_new_tokens=settings.max_tokens, num_return_sequences=settings.n,
                                       **sampling)
            for tokens in generated[:, longest:].tolist():
                end = next((i + 1 for i, token in enumerate(tokens) if token in stops), None)
                texts.append(tokenizer.decode(tokens[:end] if end else tokens, skip_special_tokens=True))
                finishes.append("stop" if end else "length")
    golds = [answer for answer in answers for _ in range(settings.n)]
    grades = grade_many(texts, golds, workers=1, timeout_s=GRADING_TIMEOUT_S, finish_reasons=finishes)
    correct = [grade.correct for grade in grades]
    return sum(correct) / len(correct)


def kd_heldout_divergence(trainer, rows, collator, batch_size: int) -> float:
    """The trainer's own loss (`compute_loss`, eval mode, no gradient) per completion token over `rows` (kd training
    rows: input_ids, completion_start and the stored teacher top-K), leaving the trainer's logged metrics as they
    were."""
    import torch

    model = trainer.model
    saved = {name: list(values) for name, values in trainer._metrics["eval"].items()}
    summed, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            batch = {name: value.to(trainer.args.device) for name, value in batch.items()}
            with trainer.autocast_smart_context_manager():
                _, per_position = trainer.compute_loss(model, batch, return_outputs=True)
            summed += per_position.float().sum().item()
            tokens += int((batch["labels"][:, 1:] != -100).sum())
    trainer._metrics["eval"].clear()
    trainer._metrics["eval"].update(saved)
    return summed / max(tokens, 1)


class Monitor:
    """The checks of one training run and what they conclude; `monitor_callback` runs them from the trainer.

    `train_losses(trainer)` returns the training divergence of each optimizer step finished since its last call;
    `heldout_divergence(trainer)` (or None) measures on the held-out rows."""

    def __init__(self, trainer, settings: MonitorSettings, *, tokenizer, prompts: list[list[int]], answers: list[str],
                 seed: int, step: str, train_losses: Callable, heldout_divergence: Callable | None = None,
                 heldout_rows: int = 0):
        self.heldout_rows = heldout_rows  # rows held out of training (all the held-out problems' rows)
        self.trainer, self.settings, self.tokenizer, self.seed, self.step = trainer, settings, tokenizer, seed, step
        self.prompts, self.answers = prompts, answers
        self.train_losses, self.heldout_divergence = train_losses, heldout_divergence
        self.checks: list[dict] = []
        self.pending: list[float] = []
        self.warned = False

    def restore(self, log_history: list[dict]) -> None:
        """The checks a resumed run made before its checkpoint (they are in the trainer state's log)."""
        self.checks = [{"step": entry["step"], **{name: entry.get(PREFIX + name) for name in MEASURES}}
                       for entry in log_history if PREFIX + PASS_RATE in entry]

    def check(self, step: int) -> dict:
        """Measure now, log the numbers into the trainer's log, and warn once if the alarm goes off."""
        from transformers import Trainer

        self.pending += self.train_losses(self.trainer)
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        try:
            measured = {"step": step,
                        PASS_RATE: round(pass_rate(model, self.tokenizer, self.prompts, self.answers, self.settings,
                                                   batch_size=trainer.args.per_device_train_batch_size,
                                                   seed=self.seed), 6),
                        HELDOUT_DIVERGENCE: (round(self.heldout_divergence(trainer), 6)
                                             if self.heldout_divergence is not None else None),
                        TRAIN_DIVERGENCE: round(sum(self.pending) / len(self.pending), 6) if self.pending else None}
        finally:
            model.train(was_training)
        self.pending = []
        self.checks.append(measured)
        # transformers' own `log`: TRL's would fold (and clear) the metrics gathered for the next logging step; and
        # logging clears the flag that makes this step's own logging happen, so it is put back
        should_log = trainer.control.should_log
        Trainer.log(trainer, {PREFIX + name: measured[name] for name in MEASURES if measured[name] is not None})
        trainer.control.should_log = should_log
        alarm = teacher_hacking(self.checks, self.settings.consecutive)
        if alarm is not None and not self.warned and trainer.is_world_process_zero():
            from pipeline.core.console import user_console

            user_console().print(f"[yellow]warning: {self.step}: {alarm_text(alarm)}[/yellow]")
            self.warned = True
        return measured

    def summary(self) -> dict:
        """The manifest's `monitor`: every check, the alarm (None: not raised) and the power-law diagnostic."""
        with_divergence = [c for c in self.checks if c[TRAIN_DIVERGENCE] is not None]
        return {"checks": self.checks, "teacher_hacking": teacher_hacking(self.checks, self.settings.consecutive),
                "power_law": power_law_departure([c["step"] for c in with_divergence],
                                                 [c[TRAIN_DIVERGENCE] for c in with_divergence],
                                                 self.settings.power_law_warmup, self.settings.power_law_tolerance)}


def metric_losses(name: str) -> Callable:
    """`Monitor.train_losses` reading the values a TRL trainer gathered under `_metrics['train'][name]` since the last
    call (the list is replaced each time the trainer logs)."""
    seen = {"list": None, "count": 0}

    def new_values(trainer) -> list[float]:
        values = trainer._metrics["train"].get(name, [])
        if values is not seen["list"]:
            seen["list"], seen["count"] = values, 0
        fresh = values[seen["count"]:]
        seen["count"] = len(values)
        return [float(v) for v in fresh]

    return new_values


def trainer_loss() -> Callable:
    """`Monitor.train_losses` reading the Trainer's own loss accumulator (`_tr_loss`, the sum of the optimizer steps'
    losses since the last logging step, which the logged `loss` averages): one value per step since the last call."""
    seen = {"sum": 0.0, "last_logged": 0}

    def new_values(trainer) -> list[float]:
        total = float(trainer._tr_loss.item())
        if trainer._globalstep_last_logged != seen["last_logged"]:  # logged (and reset) since the last call
            seen["sum"], seen["last_logged"] = 0.0, trainer._globalstep_last_logged
        fresh, seen["sum"] = total - seen["sum"], total
        return [fresh]

    return new_values


@functools.cache
def monitor_callback():
    """The TrainerCallback class that runs a `Monitor`; built on first use, so importing this module never imports
    transformers."""
    from transformers import TrainerCallback

    class MonitorCallback(TrainerCallback):
        """Checks every `every` optimizer steps and after the last; the training divergence is read each step."""

        def __init__(self, monitor: Monitor):
            self.monitor = monitor

        def on_train_begin(self, args, state, control, **kwargs):
            self.monitor.restore(state.log_history)

        def on_step_end(self, args, state, control, **kwargs):
            monitor = self.monitor
            if state.global_step % monitor.settings.every == 0 or state.global_step >= state.max_steps:
                monitor.check(state.global_step)
            else:
                monitor.pending += monitor.train_losses(monitor.trainer)

    return MonitorCallback


def attach_kd_monitor(trainer, settings: MonitorSettings, heldout, heldout_rows, *, tokenizer, k: int,
                      seed: int) -> Monitor:
    """A Monitor on a KdTrainer, added to its callbacks: the pass rate on each held-out problem's stored prompt
    (`prompt_token_ids`: the chat template as the teacher's tokenizer, which is the student's, rendered it; the very
    prompt the student trains on) and the held-out divergence over `heldout_rows` (kd training rows of `heldout`)."""
    from pipeline.text import teacher_logprobs as stored
    from pipeline.training.kd_trainer import KdCollator

    firsts = heldout.select(first_row_per_problem(heldout["id"], heldout["answer"]), keep_in_memory=True)
    collator = KdCollator(tokenizer.pad_token_id, k)
    batch_size = trainer.args.per_device_train_batch_size
    monitor = Monitor(trainer, settings, tokenizer=tokenizer, prompts=firsts[stored.PROMPT_IDS],
                      answers=[str(answer) for answer in firsts["answer"]], seed=seed, step="kd",
                      train_losses=metric_losses("kd/loss_per_token"),
                      heldout_divergence=lambda trainer: kd_heldout_divergence(trainer, heldout_rows, collator,
                                                                               batch_size),
                      heldout_rows=len(heldout))
    trainer.add_callback(monitor_callback()(monitor))
    return monitor


def attach_rollout_monitor(trainer, settings: MonitorSettings, heldout, messages: Callable[[dict], list[dict]], *,
                           tokenizer, seed: int, step: str) -> Monitor:
    """A Monitor on an on-policy trainer (TRL's Distillation, GOLD or ServerDistillation trainer), added to its
    callbacks: the pass rate on each held-out problem, its `messages(row)` rendered with the tokenizer's chat template
    as the rollouts render them (think prefix included), and the training divergence from the trainer's own loss. No
    held-out divergence: these rows carry no teacher distribution, and the teacher is not run for the monitor."""
    firsts = heldout.select(first_row_per_problem(heldout["id"], heldout["answer"]), keep_in_memory=True)
    prompts = [tokenizer.apply_chat_template(messages(row), add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for row in firsts]
    monitor = Monitor(trainer, settings, tokenizer=tokenizer, prompts=prompts,
                      answers=[str(answer) for answer in firsts["answer"]], seed=seed, step=step,
                      train_losses=trainer_loss(), heldout_rows=len(heldout))
    trainer.add_callback(monitor_callback()(monitor))
    return monitor
