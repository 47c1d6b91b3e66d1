"""`select`: graded samples -> SFT data, verified traces in TRL's conversational format.

Reads the graded dataset (samples + `correct`) and writes `id` and `messages` = the prompt the sample
was generated from + the assistant's completion, and, where the samples record them, how the trace was sampled
(`SAMPLING_COLUMNS`: the think prefix, the prompt text the model read, and the model as `sampled_by`), which the
training steps' template check compares with the prompt they train on. Policies, per problem, over its correct
samples:

    first_correct   the one with the lowest sample_idx (the REDI paper's stage-1 choice)
    all_correct     all of them, in sample_idx order
    shortest_k      the k shortest (completion_tokens, then characters; ties by sample_idx)

`max_tokens` drops traces longer than that many tokens of the student's tokenizer before the policy
picks. If the samples were generated after a think prefix (a `think_prefix` column, written by the
sample step), the assistant message starts with it: the student learns to write what the teacher was
conditioned on. Problems without an eligible correct sample are left out. In a `--dry-run`, if no problem has
one, each problem's first sample stands in (whatever its label) so that the training steps after it still run.
"""

from __future__ import annotations

from collections import defaultdict
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.steps import StepConfig, require_columns

REQUIRED_COLUMNS = ("id", "prompt", "completion", "correct", "sample_idx")
# Sample columns carried into training data (as named here): how each trace was sampled.
SAMPLING_COLUMNS = {"think_prefix": "think_prefix", "prompt_text": "prompt_text", "model": "sampled_by"}


class Config(StepConfig):
    input: str = Field(description="Name of the graded-samples step (the `verify` step) to select from.")
    keep: Literal["first_correct", "all_correct", "shortest_k"] = Field(
        default="first_correct",
        description="Which correct samples become SFT data, per problem. first_correct: the lowest sample_idx; "
        "all_correct: every one; shortest_k: the k shortest.",
    )
    k: int | None = Field(default=None, ge=1, description="Traces per problem for keep: shortest_k.")
    max_tokens: int | None = Field(
        default=None, ge=1,
        description="Leave out traces (think prefix + completion) longer than this many tokens of "
                    "`tokenizer`'s tokenizer; needs `tokenizer`.")
    tokenizer: str | None = Field(
        default=None, description="Model whose tokenizer counts tokens for max_tokens (the student): "
                                  "builtin:NAME, step:NAME, a local dir or a hub id.")

    @model_validator(mode="after")
    def _options_fit(self):
        if self.keep == "shortest_k" and self.k is None:
            raise ValueError("keep: shortest_k needs k (traces per problem)")
        if self.keep != "shortest_k" and self.k is not None:
            raise ValueError(f"k is only used by keep: shortest_k (keep is {self.keep})")
        if self.max_tokens is not None and self.tokenizer is None:
            raise ValueError("max_tokens counts tokens of a model's tokenizer: set tokenizer (e.g. the student)")
        return self

    path_fields: ClassVar = ()
    uses_seed: ClassVar = False
    code_version: ClassVar = "2"  # carries the sampling columns (think_prefix, prompt_text, sampled_by)

    def model_refs(self) -> list[str]:
        return [self.tokenizer] if self.tokenizer else []


def assistant_texts(columns: dict) -> list[str]:
    """Assistant message per row: the think prefix the completion continues (if recorded), then the completion."""
    prefixes = columns.get("think_prefix") or [""] * len(columns["completion"])
    return [(prefix or "") + (completion or "") for prefix, completion in zip(prefixes, columns["completion"])]


def token_counter(model_ref: str, inputs):
    """`count(texts) -> list[int]` with the tokenizer of `model_ref` (no special tokens added)."""
    from transformers import AutoTokenizer

    from pipeline.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_ref, inputs))
    return lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]


def run(cfg: Config, inputs, out):
    from datasets import Dataset, Features

    graded = inputs[cfg.input].dataset()
    require_columns(graded, REQUIRED_COLUMNS, step="select", source=cfg.input, reads="the output of a verify step")

    optional = [c for c in ("completion_tokens", *SAMPLING_COLUMNS) if c in graded.column_names]
    columns = graded.select_columns(list(REQUIRED_COLUMNS) + optional).to_dict()
    ids, sample_idx = columns["id"], columns["sample_idx"]
    texts = assistant_texts(columns)
    lengths = (token_counter(cfg.tokenizer, inputs)(texts) if cfg.max_tokens is not None
               else columns.get("completion_tokens") or [len(t) for t in texts])

    correct_rows: dict[str, list[int]] = defaultdict(list)  # problem id -> its eligible correct rows
    too_long = 0
    for row, is_correct in enumerate(columns["correct"]):
        if not is_correct:
            continue
        if cfg.max_tokens is not None and lengths[row] > cfg.max_tokens:
            too_long += 1
            continue
        correct_rows[ids[row]].append(row)

    problems_in = list(dict.fromkeys(ids))  # input order, each problem once
    kept_rows = []
    for problem_id in problems_in:
        rows = sorted(correct_rows.get(problem_id, []), key=lambda r: sample_idx[r])
        if cfg.keep == "first_correct":
            rows = rows[:1]
        elif cfg.keep == "shortest_k":
            rows = sorted(rows, key=lambda r: (lengths[r], len(texts[r]), sample_idx[r]))[:cfg.k]
        kept_rows += rows
    dry_run_stand_ins = not kept_rows and out.dry_run
    if dry_run_stand_ins:
        kept_rows = [rows[0] for rows in rows_by_problem(ids, sample_idx).values()]
        warn_dry_run_stand_ins("select", "no problem has a correct sample", len(kept_rows))
    selected = {
        "id": [ids[row] for row in kept_rows],
        "messages": [list(columns["prompt"][row]) + [{"role": "assistant", "content": texts[row]}]
                     for row in kept_rows],
        **sampling_columns(columns, kept_rows),
    }
    # Explicit features so that a selection with no rows still has the right schema.
    features = Features({"id": graded.features["id"], "messages": graded.features["prompt"],
                         **sampling_features(graded.features)})
    return out.write_dataset(
        Dataset.from_dict(selected, features=features),
        samples_in=len(ids),
        problems_in=len(problems_in),
        problems_kept=len(set(selected["id"])),
        **({"dropped_too_long": too_long} if cfg.max_tokens is not None else {}),
        **({"dry_run_stand_ins": len(kept_rows)} if dry_run_stand_ins else {}),
    )


def sampling_columns(columns: dict, rows: list[int]) -> dict:
    """The `SAMPLING_COLUMNS` the samples have, for `rows`, under their training-data names."""
    return {name: [columns[column][row] for row in rows] for column, name in SAMPLING_COLUMNS.items()
            if column in columns}


def sampling_features(features) -> dict:
    return {name: features[column] for column, name in SAMPLING_COLUMNS.items() if column in features}


def rows_by_problem(ids: list, sample_idx: list[int]) -> dict:
    """Problem id -> its rows in sample_idx order; problems in input order."""
    rows: dict = {problem_id: [] for problem_id in ids}
    for row in sorted(range(len(ids)), key=lambda r: sample_idx[r]):
        rows[ids[row]].append(row)
    return rows


def warn_dry_run_stand_ins(step: str, why: str, rows: int) -> None:
    # A dry run's samples (2 per problem, 16 tokens) seldom hold a correct answer. So that the steps after this one
    # still run on something, it writes stand-ins whatever their labels; a dry run's data is never for use.
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]{step}: {why} in this dry run; writing {rows} stand-in row(s) whatever "
                               f"their labels, so that the steps after it run (never in a real run)")
