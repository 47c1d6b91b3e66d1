"""Step registry.

A step type is one module here with a pydantic `Config` (fields carry help text) and a
`run(cfg, inputs, out) -> Artifact` function. Config modules import nothing heavy at import
time, so validating a recipe never loads torch or vLLM; `run` imports what it needs.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

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
}


class StepConfig(BaseModel):
    """Fields every step has. Subclasses add their own and set `produces`."""

    model_config = ConfigDict(extra="forbid")

    uses: str = Field(description="Step type, one of the registered names (load, sample, verify, ...).")
    input: str | None = Field(default=None, description="Name of an earlier step whose dataset this step reads.")

    # What the step writes: a dataset (data/), a model (model/) or a report (files only).
    produces: ClassVar[Literal["dataset", "model", "report"]] = "dataset"
    # Settings applied under `distill run --dry-run`: a handful of rows, tiny token budgets.
    dry_run_overrides: ClassVar[dict[str, Any]] = {}

    def model_refs(self) -> list[str]:
        """Model references this step reads (checked at load; `step:NAME` ones are dependencies)."""
        return []

    def dataset_inputs(self) -> list[str]:
        """Names of earlier steps whose datasets this step reads."""
        return [self.input] if self.input else []


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
