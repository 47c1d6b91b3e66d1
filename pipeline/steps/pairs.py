"""`pairs`: graded samples -> REDI preference pairs in TRL's conversational preference format.

For each problem with at least one correct and one rejected sample: chosen = its first correct sample,
rejected = its first rejected one (lowest sample_idx, REDI's choice); with `max_pairs_per_problem: k`,
the i-th correct goes with the i-th rejected for i < k. Rejected means label `incorrect` by default:
a truncated or unanswered sample is not evidence of a wrong answer (`rejected_labels` widens it to those). An
ungraded sample (bad_gold, timeout, error: eval.answers.UNGRADED) never is: the grader decided nothing about it.
Samples over the length limits are left out before pairing. In a `--dry-run`, if no problem makes a pair, each
problem's first two samples stand in as chosen and rejected (whatever their labels) so that REDI after it still runs.

Output: `id`, `prompt` (the chat messages sampled from), `chosen` and `rejected` ([assistant message],
starting with the sample's think prefix if it had one), and how the chosen trace was sampled (`think_prefix`,
`prompt_text`, `sampled_by`, where the samples record them; see `select`).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from eval.answers import GRADED
from pipeline.core.funnel import Count, FunnelStage
from pipeline.core.step import StepConfig, require_columns
from pipeline.text.columns import (
    arrow_columns,
    numbers,
    problem_index,
    ranks_in_problem,
    rows_by_problem,
    token_counter,
    token_counts,
)
from pipeline.text.rows import (
    SAMPLING_COLUMNS,
    assistant_texts,
    message,
    message_list,
    sampling_columns,
    sampling_features,
    warn_dry_run_stand_ins,
    write_rows,
)

REQUIRED_COLUMNS = ("id", "prompt", "completion", "correct", "label", "sample_idx")
REJECTABLE_LABELS = tuple(label for label in GRADED if label != "correct")  # incorrect, no_answer, truncated


class Config(StepConfig):
    input: str = Field(description="Name of the graded-samples step (the `verify` step) to pair from.")
    max_pairs_per_problem: int = Field(
        default=1, ge=1, description="Pairs per problem: the i-th correct with the i-th rejected sample, "
                                     "by sample_idx (REDI: 1).")
    rejected_labels: list[str] = Field(
        default=["incorrect"],
        description=f"Labels that make a sample a rejected answer, from {list(REJECTABLE_LABELS)}. "
                    "Ungraded samples (bad_gold, timeout, error) never count: their grade says nothing about "
                    "the answer.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Leave out samples whose response is longer than this many tokens of "
                                        "`tokenizer`'s tokenizer; needs `tokenizer`.")
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, description="Leave out problems whose prompt (message texts) is longer than this many "
                                        "tokens of `tokenizer`'s tokenizer (REDI: 800); needs `tokenizer`.")
    max_chars: int | None = Field(
        default=None, ge=1, description="Leave out samples whose response is longer than this many characters.")
    tokenizer: str | None = Field(
        default=None, description="Model whose tokenizer counts tokens (the student): builtin:NAME, step:NAME, "
                                  "a local dir or a hub id.")

    @model_validator(mode="after")
    def _options_fit(self):
        unknown = sorted(set(self.rejected_labels) - set(REJECTABLE_LABELS))
        if unknown or not self.rejected_labels:
            raise ValueError(f"rejected_labels must be a non-empty subset of {list(REJECTABLE_LABELS)}; "
                             f"got {self.rejected_labels}")
        if (self.max_tokens is not None or self.max_prompt_tokens is not None) and self.tokenizer is None:
            raise ValueError("max_tokens and max_prompt_tokens count tokens of a model's tokenizer: set tokenizer")
        return self

    path_fields: ClassVar = ()
    uses_seed: ClassVar = False
    code_version: ClassVar = "2"  # carries the sampling columns (think_prefix, prompt_text, sampled_by)

    def model_refs(self) -> list[str]:
        return [self.tokenizer] if self.tokenizer else []


def funnel_stage(stats: dict) -> FunnelStage:
    """The run page's data funnel: the preference pairs, and the problems and samples left out."""
    return FunnelStage("preference pairs", stats["problems_paired"], dropped=[
        Count("problems_without_correct", "problems without a correct sample", stats["problems_without_correct"]),
        Count("problems_without_rejected", "problems without a rejected sample", stats["problems_without_rejected"]),
        Count("samples_too_long", "samples over the length limits (before pairing)", stats["samples_too_long"])])


def run(cfg: Config, inputs, out):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Features

    graded = inputs[cfg.input].dataset()
    require_columns(graded, REQUIRED_COLUMNS, step="pairs", source=cfg.input, reads="the output of a verify step")
    # Pairs are matched on the small columns, in numpy; the traces are only read to measure and write them.
    text_columns = [c for c in ("think_prefix", "completion") if c in graded.column_names]
    columns = arrow_columns(graded, ["id", "correct", "label", "sample_idx"])
    codes, problem_ids = problem_index(columns["id"])
    sample_idx = numbers(columns["sample_idx"], np.int64)

    too_long = np.zeros(len(codes), dtype=bool)
    if cfg.max_chars is not None:
        texts = assistant_texts(arrow_columns(graded, text_columns))
        too_long = numbers(pc.utf8_length(texts), np.int64) > cfg.max_chars
    if cfg.tokenizer is not None:
        count = token_counter(cfg.tokenizer, inputs)
        if cfg.max_tokens is not None:
            too_long |= token_counts(count, graded.select_columns(text_columns), assistant_texts) > cfg.max_tokens
        if cfg.max_prompt_tokens is not None:
            too_long |= token_counts(count, graded.select_columns(["prompt"]), prompt_texts) > cfg.max_prompt_tokens

    usable = ~too_long
    chosen = usable & numbers(columns["correct"], bool)
    rejected = usable & ~chosen & pc.fill_null(pc.is_in(columns["label"], pa.array(cfg.rejected_labels)),
                                               False).to_numpy(zero_copy_only=False)
    # each problem's chosen and rejected rows in sample_idx order; the i-th of one goes with the i-th of the other
    chosen_rows, rejected_rows = (rows[np.lexsort((rows, sample_idx[rows], codes[rows]))]
                                  for rows in (np.flatnonzero(chosen), np.flatnonzero(rejected)))
    chosen_count = np.bincount(codes[chosen_rows], minlength=len(problem_ids))
    rejected_count = np.bincount(codes[rejected_rows], minlength=len(problem_ids))
    pairs_of = np.minimum(np.minimum(chosen_count, rejected_count), cfg.max_pairs_per_problem)
    pair_chosen = chosen_rows[ranks_in_problem(codes[chosen_rows]) < pairs_of[codes[chosen_rows]]]
    pair_rejected = rejected_rows[ranks_in_problem(codes[rejected_rows]) < pairs_of[codes[rejected_rows]]]
    dry_run_stand_ins = not len(pair_chosen) and out.dry_run
    if dry_run_stand_ins:  # each problem's first two samples as chosen and rejected (see select)
        stand_ins = [rows[:2] for rows in rows_by_problem(codes.tolist(), sample_idx.tolist()).values()
                     if len(rows) > 1]
        pair_chosen = np.array([rows[0] for rows in stand_ins], dtype=np.int64)
        pair_rejected = np.array([rows[1] for rows in stand_ins], dtype=np.int64)
        warn_dry_run_stand_ins("pairs", "no problem has both a correct and a rejected sample", len(pair_chosen))

    chosen_source = graded.select_columns(
        ["id", "prompt", *text_columns, *(c for c in SAMPLING_COLUMNS if c in graded.column_names
                                          and c not in text_columns)]).with_format("arrow")
    rejected_source = graded.select_columns(text_columns).with_format("arrow")
    messages = graded.features["prompt"]
    list_type = graded.features.arrow_schema.field("prompt").type

    def batch(start: int, stop: int) -> pa.Table:
        table = chosen_source[pair_chosen[start:stop]]
        rejected_texts = assistant_texts(rejected_source[pair_rejected[start:stop]])
        return pa.table({"id": table["id"], "prompt": table["prompt"],
                         "chosen": message_list(message(assistant_texts(table), list_type.value_type), list_type),
                         "rejected": message_list(message(rejected_texts, list_type.value_type), list_type),
                         **sampling_columns(table)})

    features = Features({"id": graded.features["id"], "prompt": messages, "chosen": messages, "rejected": messages,
                         **sampling_features(graded.features)})
    return out.write_dataset(
        write_rows(len(pair_chosen), batch, features, out.scratch / "pairs.arrow"),
        samples_in=len(codes),
        problems_in=len(problem_ids),
        problems_paired=len(np.unique(codes[pair_chosen])),
        problems_without_correct=int((chosen_count == 0).sum()),
        problems_without_rejected=int((rejected_count == 0).sum()),
        samples_too_long=int(too_long.sum()),
        **({"dry_run_stand_ins": len(pair_chosen)} if dry_run_stand_ins else {}),
    )


def prompt_texts(table):
    """Each prompt's message texts joined by newlines (Arrow), the text the prompt-length limit counts."""
    import pyarrow.compute as pc

    prompts = table["prompt"].combine_chunks()
    contents = type(prompts).from_arrays(prompts.offsets, prompts.values.field("content"))
    return pc.binary_join(contents, "\n")
