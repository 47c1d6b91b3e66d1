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

from collections import defaultdict
from typing import ClassVar

from pydantic import Field, model_validator

from eval.answers import GRADED
from pipeline.steps import StepConfig, require_columns
from pipeline.steps.select import (SAMPLING_COLUMNS, assistant_texts, rows_by_problem, sampling_columns,
                                   sampling_features, token_counter, warn_dry_run_stand_ins)

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


def run(cfg: Config, inputs, out):
    from datasets import Dataset, Features

    graded = inputs[cfg.input].dataset()
    require_columns(graded, REQUIRED_COLUMNS, step="pairs", source=cfg.input, reads="the output of a verify step")
    optional = [c for c in SAMPLING_COLUMNS if c in graded.column_names]
    columns = graded.select_columns(list(REQUIRED_COLUMNS) + optional).to_dict()
    ids, labels, sample_idx = columns["id"], columns["label"], columns["sample_idx"]
    texts = assistant_texts(columns)

    too_long = [False] * len(ids)
    if cfg.max_chars is not None:
        too_long = [len(text) > cfg.max_chars for text in texts]
    if cfg.tokenizer is not None:
        count = token_counter(cfg.tokenizer, inputs)
        if cfg.max_tokens is not None:
            too_long = [long or tokens > cfg.max_tokens for long, tokens in zip(too_long, count(texts))]
        if cfg.max_prompt_tokens is not None:
            prompt_texts = ["\n".join(m["content"] for m in messages) for messages in columns["prompt"]]
            too_long = [long or tokens > cfg.max_prompt_tokens for long, tokens in zip(too_long, count(prompt_texts))]

    chosen_rows: dict[str, list[int]] = defaultdict(list)
    rejected_rows: dict[str, list[int]] = defaultdict(list)
    for row in sorted(range(len(ids)), key=lambda r: sample_idx[r]):
        if too_long[row]:
            continue
        if columns["correct"][row]:
            chosen_rows[ids[row]].append(row)
        elif labels[row] in cfg.rejected_labels:
            rejected_rows[ids[row]].append(row)

    problems_in = list(dict.fromkeys(ids))
    pairs = []
    for problem_id in problems_in:
        matched = list(zip(chosen_rows[problem_id], rejected_rows[problem_id]))
        pairs += [(problem_id, chosen, rejected) for chosen, rejected in matched[:cfg.max_pairs_per_problem]]
    dry_run_stand_ins = not pairs and out.dry_run
    if dry_run_stand_ins:  # each problem's first two samples as chosen and rejected (see select)
        pairs = [(problem_id, rows[0], rows[1])
                 for problem_id, rows in rows_by_problem(ids, sample_idx).items() if len(rows) > 1]
        warn_dry_run_stand_ins("pairs", "no problem has both a correct and a rejected sample", len(pairs))

    def message(row: int) -> list[dict]:
        return [{"role": "assistant", "content": texts[row]}]

    data = {
        "id": [problem_id for problem_id, _, _ in pairs],
        "prompt": [list(columns["prompt"][chosen]) for _, chosen, _ in pairs],
        "chosen": [message(chosen) for _, chosen, _ in pairs],
        "rejected": [message(rejected) for _, _, rejected in pairs],
        **sampling_columns(columns, [chosen for _, chosen, _ in pairs]),
    }
    messages = graded.features["prompt"]
    features = Features({"id": graded.features["id"], "prompt": messages, "chosen": messages, "rejected": messages,
                         **sampling_features(graded.features)})
    return out.write_dataset(
        Dataset.from_dict(data, features=features),
        samples_in=len(ids),
        problems_in=len(problems_in),
        problems_paired=len(set(data["id"])),
        problems_without_correct=sum(not chosen_rows[p] for p in problems_in),
        problems_without_rejected=sum(not rejected_rows[p] for p in problems_in),
        samples_too_long=sum(too_long),
        **({"dry_run_stand_ins": len(pairs)} if dry_run_stand_ins else {}),
    )
