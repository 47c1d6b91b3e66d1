"""`select`: graded samples -> SFT data, verified traces in TRL's conversational format.

Reads the graded dataset (samples + `correct`) and writes `id` and `messages` = the prompt the sample
was generated from + the assistant's completion, and, where the samples record them, how the trace was sampled
(`SAMPLING_COLUMNS`: the think prefix, the prompt text the model read, and the model as `sampled_by`), which the
training steps' template check compares with the prompt they train on. Policies, per problem, over its correct
samples:

    first_correct   the one with the lowest sample_idx (the REDI paper's stage-1 choice)
    all_correct     all of them, in sample_idx order
    shortest_k      the k shortest (completion_tokens, then characters; ties by sample_idx)

From a `teachers` step (its samples of every teacher, ranked): `from: best_teacher` keeps the samples of the teacher
it ranked first, `from: <teacher>` those of a named one, and `from: best_per_problem` each problem's samples of the
highest-ranked teacher with an eligible correct sample for it (so a problem the best teacher never solved still gets
the next one's trace); the policy then picks among them.

`max_tokens` drops traces longer than that many tokens of the student's tokenizer before the policy
picks. If the samples were generated after a think prefix (a `think_prefix` column, written by the
sample step), the assistant message starts with it: the student learns to write what the teacher was
conditioned on. Problems without an eligible correct sample are left out. In a `--dry-run`, if no problem has
one, each problem's first sample stands in (whatever its label) so that the training steps after it still run.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from pipeline.core.errors import UserError
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
    sampling_columns,
    sampling_features,
    warn_dry_run_stand_ins,
    with_message,
    write_rows,
)

REQUIRED_COLUMNS = ("id", "prompt", "completion", "correct", "sample_idx")


class Config(StepConfig):
    # `from` is a Python keyword: the field is `from_`, written `from` in recipes
    model_config = ConfigDict(**StepConfig.model_config, populate_by_name=True)

    input: str = Field(description="Name of the graded-samples step (the `verify` step, or a `teachers` step) to "
                                   "select from.")
    from_: str | None = Field(
        default=None, alias="from",
        description="With a teachers step as input, whose samples: best_teacher (its ranking's first), "
                    "best_per_problem (per problem, the highest-ranked teacher with an eligible correct sample) or "
                    "a teacher's name. null: every sample of the input.")
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


def funnel_stage(stats: dict) -> FunnelStage:
    """The run page's data funnel: the selected traces, and the problems and traces left out."""
    return FunnelStage("selected traces", stats["problems_kept"], dropped=[
        Count("problems_in - problems_kept", "problems without an eligible correct sample",
              stats["problems_in"] - stats["problems_kept"]),
        Count("dropped_too_long", "correct samples over max_tokens", stats.get("dropped_too_long", 0))])


def run(cfg: Config, inputs, out):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Features

    graded = inputs[cfg.input].dataset()
    require_columns(graded, REQUIRED_COLUMNS, step="select", source=cfg.input, reads="the output of a verify step")

    # Which rows to keep is worked out on the small columns, in numpy; the traces are only read to write them.
    text_columns = [c for c in ("think_prefix", "completion") if c in graded.column_names]
    columns = arrow_columns(graded, ["id", "correct", "sample_idx"]
                            + [c for c in ("completion_tokens",) if c in graded.column_names])
    codes, problem_ids = problem_index(columns["id"])
    sample_idx = numbers(columns["sample_idx"], np.int64)
    eligible = numbers(columns["correct"], bool)
    characters = None
    if cfg.max_tokens is not None:
        lengths = token_counts(token_counter(cfg.tokenizer, inputs), graded.select_columns(text_columns),
                               assistant_texts)
    elif "completion_tokens" in columns.column_names and len(codes):
        lengths = numbers(columns["completion_tokens"], np.int64)
    else:
        characters = lengths = numbers(pc.utf8_length(assistant_texts(arrow_columns(graded, text_columns))),
                                       np.int64)
    too_long = 0
    if cfg.max_tokens is not None:
        over = eligible & (lengths > cfg.max_tokens)
        too_long = int(over.sum())
        eligible &= ~over
    teachers_kept = {}
    if cfg.from_ is not None:
        from_teacher, teachers_kept = teacher_rows(cfg, inputs[cfg.input], graded, codes, eligible)
        eligible &= from_teacher

    rows = np.flatnonzero(eligible)
    if cfg.keep == "shortest_k":  # by length in tokens, then characters, then sample_idx
        if characters is None:
            characters = numbers(pc.utf8_length(assistant_texts(arrow_columns(graded, text_columns))), np.int64)
        order = np.lexsort((rows, sample_idx[rows], characters[rows], lengths[rows], codes[rows]))
    else:  # by sample_idx; problems in input order
        order = np.lexsort((rows, sample_idx[rows], codes[rows]))
    rows = rows[order]
    per_problem = {"first_correct": 1, "shortest_k": cfg.k, "all_correct": len(rows)}[cfg.keep]
    kept_rows = rows[ranks_in_problem(codes[rows]) < per_problem]
    dry_run_stand_ins = not len(kept_rows) and out.dry_run
    if dry_run_stand_ins:
        kept_rows = np.array([problem_rows[0] for problem_rows
                              in rows_by_problem(codes.tolist(), sample_idx.tolist()).values()])
        warn_dry_run_stand_ins("select", "no problem has a correct sample", len(kept_rows))

    source = graded.select_columns(["id", "prompt", *text_columns, *(c for c in SAMPLING_COLUMNS
                                                                     if c in graded.column_names and
                                                                     c not in text_columns)]).with_format("arrow")

    def batch(start: int, stop: int) -> pa.Table:
        table = source[kept_rows[start:stop]]
        return pa.table({"id": table["id"], "messages": with_message(table["prompt"], assistant_texts(table)),
                         **sampling_columns(table)})

    # Explicit features so that a selection with no rows still has the right schema.
    features = Features({"id": graded.features["id"], "messages": graded.features["prompt"],
                         **sampling_features(graded.features)})
    return out.write_dataset(
        write_rows(len(kept_rows), batch, features, out.scratch / "selected.arrow"),
        samples_in=len(codes),
        problems_in=len(problem_ids),
        problems_kept=len(np.unique(codes[kept_rows])),
        **({"dropped_too_long": too_long} if cfg.max_tokens is not None else {}),
        **({"dry_run_stand_ins": len(kept_rows)} if dry_run_stand_ins else {}),
        **({"from": cfg.from_, "problems_by_teacher": teachers_kept} if cfg.from_ is not None else {}),
    )


def teacher_rows(cfg: Config, source, graded, codes, eligible):
    """Which rows of a teachers step's samples `from` keeps (a boolean mask), and how many problems each teacher
    supplies."""
    import numpy as np

    if "teacher" not in graded.column_names or "ranking" not in source.stats:
        raise UserError(f"select: `from: {cfg.from_}` picks among teachers, but step {cfg.input!r} is not a "
                        "teachers step (its samples have no `teacher` column, its manifest no ranking)")
    ranking = source.stats["ranking"]
    teachers = numbers_of(arrow_columns(graded, ["teacher"])["teacher"], ranking)
    if cfg.from_ == "best_per_problem":
        # Per problem, the best rank among its eligible rows; rows of that teacher are kept.
        best = np.full(codes.max() + 1 if len(codes) else 0, len(ranking))
        np.minimum.at(best, codes[eligible], teachers[eligible])
        keep = teachers == best[codes]
    else:
        name = ranking[0] if cfg.from_ == "best_teacher" else cfg.from_
        if name not in ranking:
            raise UserError(f"select: from: {cfg.from_!r} is not a teacher of step {cfg.input!r} (teachers: "
                            f"{', '.join(ranking)}; or best_teacher, best_per_problem)")
        keep = teachers == ranking.index(name)
    supplied = np.unique(np.stack([codes[keep & eligible], teachers[keep & eligible]]), axis=1)
    return keep, {name: int((supplied[1] == rank).sum()) for rank, name in enumerate(ranking)}


def numbers_of(column, names: list[str]):
    """Each row's position of its value in `names`, as numpy (len(names) for a value not among them)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    return numbers(pc.fill_null(pc.index_in(column, value_set=pa.array(names)), len(names)), np.int64)
