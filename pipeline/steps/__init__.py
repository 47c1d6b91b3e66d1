"""Step registry.

A step type is one module here with a pydantic `Config` (fields carry help text) and a
`run(cfg, inputs, out) -> Artifact` function. Config modules import nothing heavy at import
time, so validating a recipe never loads torch or vLLM; `run` imports what it needs.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import UserError

# name -> module under pipeline.steps
STEP_MODULES = {
    "load": "load",
    "sample": "sample",
    "verify": "verify",
    "select": "select",
    "pairs": "pairs",
    "filter": "filter",
    "sft": "sft",
    "redi": "redi",
    "opsd": "opsd",
    "onpolicy": "onpolicy",
    "merge": "merge",
    "evaluate": "evaluate",
    "teachers": "teachers",
}


class StepConfig(BaseModel):
    """Fields every step has. Subclasses add their own and set `produces`."""

    model_config = ConfigDict(extra="forbid")

    uses: str = Field(description="Step type, one of the registered names (load, sample, verify, ...).")
    input: str | None = Field(default=None, description="Name of an earlier step whose dataset this step reads.")
    seed: int | None = Field(default=None, description=(
        "This step's seed; null = the recipe's. Pin it to hold a step (say, teacher sampling) fixed while "
        "`distill run --seeds` varies the rest. Only for steps that draw random numbers."))

    # What the step writes: a dataset (data/), a model (model/) or a report (files only).
    produces: ClassVar[Literal["dataset", "model", "report"]] = "dataset"
    # Settings applied under `distill run --dry-run`: a handful of rows, tiny token budgets.
    dry_run_overrides: ClassVar[dict[str, Any]] = {}
    # What else the step's key covers (runner.step_inputs). Fields holding paths of files or directories the step
    # reads: their content is hashed. None (a user's step that does not say) means every string setting that names
    # an existing file or directory. Libraries (distribution names, as in pipeline.env) whose versions change what
    # the step writes. The version of the step's own code: bump it when a change alters what the step writes
    # (a user's step module is keyed by the sha256 of its source file instead).
    path_fields: ClassVar[tuple[str, ...] | None] = None
    libraries: ClassVar[tuple[str, ...]] = ()
    code_version: ClassVar[str] = "1"
    # Whether the step draws random numbers (sampling, training). One that does not is keyed without the seed, so
    # the runs of `distill run --seeds` share it whenever its inputs are the same.
    uses_seed: ClassVar[bool] = True

    @model_validator(mode="after")
    def _seed_only_where_used(self) -> "StepConfig":
        if self.seed is not None and not self.uses_seed:
            raise ValueError(f"seed: a {self.uses} step draws no random numbers, so it takes no seed")
        return self

    def effective_seed(self, recipe_seed: int) -> int | None:
        """The seed this step runs with (its own, else the recipe's); None for a step that draws none."""
        if not self.uses_seed:
            return None
        return recipe_seed if self.seed is None else self.seed

    def model_refs(self) -> list[str]:
        """Model references this step reads (checked at load; `step:NAME` ones are dependencies)."""
        return []

    def input_paths(self) -> list[str]:
        """Files and directories this step reads by path (not models, not earlier steps' outputs)."""
        values = ([getattr(self, name) for name in self.path_fields] if self.path_fields is not None else
                  [v for name in type(self).model_fields if name not in ("uses", "input")
                   for v in _strings(getattr(self, name)) if v not in self.model_refs() and _names_a_path(v)])
        return [p for v in values for p in _strings(v)]

    def check_inputs(self) -> None:
        """Refuse, with a UserError naming the file (and line), input this step could never use. Called for each
        step that is going to run before anything is written, so a bad data file fails the run before it starts."""

    def dataset_inputs(self) -> list[str]:
        """Names of earlier steps whose datasets this step reads."""
        return [self.input] if self.input else []


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, (list, tuple)) else []


def _names_a_path(value: str) -> bool:
    from pathlib import Path

    # "." or ".." would make a whole tree (the repo, the workdir) an input
    return value.strip() not in ("", ".", "..", "/") and "\n" not in value and len(value) < 4096 \
        and Path(value).expanduser().exists()


def repeated(names: list[str]) -> list[str]:
    """The names listed more than once, sorted (for validators of lists that must not repeat)."""
    return sorted({name for name in names if names.count(name) > 1})


def require_columns(dataset, columns, *, step: str, source: str, reads: str = "") -> None:
    """Refuse a dataset lacking columns a step needs, naming the step, the input step and what the dataset has."""
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise UserError(f"{step}: dataset of step {source!r} lacks column(s) {', '.join(missing)} "
                        f"(it has {', '.join(dataset.column_names)})" + (f"; {step} reads {reads}" if reads else ""))


def step_module(name: str):
    """A registered step by name, or a user's own step module by dotted import path (`mypkg.steps.score`)."""
    if name in STEP_MODULES:
        return importlib.import_module(f"pipeline.steps.{STEP_MODULES[name]}")
    if "." not in name:
        raise UserError(f"unknown step type {name!r} (known: {', '.join(STEP_MODULES)}, or a dotted module path)")
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"step type {name!r}: cannot import module ({e})") from None
    if not (hasattr(module, "run") and isinstance(getattr(module, "Config", None), type)
            and issubclass(module.Config, StepConfig)):
        raise UserError(f"step type {name!r}: a step module needs `Config(StepConfig)` and `run(cfg, inputs, out)`")
    return module


def config_class(name: str) -> type[StepConfig]:
    return step_module(name).Config
