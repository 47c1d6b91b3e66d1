"""`select`: graded samples -> SFT data, one verified trace per problem.

Reads the graded dataset (samples + `correct`) and writes TRL's conversational format: `id` and
`messages` = the prompt the sample was generated from + the assistant's completion. With
`keep: first_correct` (the REDI paper's stage-1 choice) a problem contributes its correct sample
with the lowest `sample_idx`; problems without a correct sample are left out.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.errors import UserError
from pipeline.steps import StepConfig

REQUIRED_COLUMNS = ("id", "prompt", "completion", "correct", "sample_idx")


class Config(StepConfig):
    input: str = Field(description="Name of the graded-samples step (the `verify` step) to select from.")
    keep: Literal["first_correct"] = Field(
        default="first_correct",
        description="Which samples become SFT data. first_correct: per problem, the correct sample with the "
        "lowest sample_idx.",
    )


def run(cfg: Config, inputs, out):
    from datasets import Dataset, Features

    graded = inputs[cfg.input].dataset()
    missing = [column for column in REQUIRED_COLUMNS if column not in graded.column_names]
    if missing:
        raise UserError(
            f"select: dataset of step {cfg.input!r} lacks column(s) {', '.join(missing)} "
            f"(it has {', '.join(graded.column_names)}); select reads the output of a verify step"
        )

    columns = graded.select_columns(list(REQUIRED_COLUMNS)).to_dict()
    ids, correct, sample_idx = columns["id"], columns["correct"], columns["sample_idx"]
    first_correct_row: dict[str, int] = {}  # problem id -> row of its correct sample with the lowest sample_idx
    for row, (problem_id, is_correct, idx) in enumerate(zip(ids, correct, sample_idx)):
        if is_correct and (problem_id not in first_correct_row or idx < sample_idx[first_correct_row[problem_id]]):
            first_correct_row[problem_id] = row

    problems_in = list(dict.fromkeys(ids))  # input order, each problem once
    kept_rows = [first_correct_row[problem_id] for problem_id in problems_in if problem_id in first_correct_row]
    selected = {
        "id": [ids[row] for row in kept_rows],
        "messages": [
            list(columns["prompt"][row]) + [{"role": "assistant", "content": columns["completion"][row]}]
            for row in kept_rows
        ],
    }
    # Explicit features so that a selection with no rows still has the right schema.
    features = Features({"id": graded.features["id"], "messages": graded.features["prompt"]})
    return out.write_dataset(
        Dataset.from_dict(selected, features=features),
        samples_in=len(ids),
        problems_in=len(problems_in),
        problems_kept=len(kept_rows),
    )
