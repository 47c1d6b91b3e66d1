"""The step base class (`StepConfig`) and registry (`step_module`: `uses:` name -> module).

A step type is one module in `pipeline.steps` with a pydantic `Config` (fields carry help text) and a
`run(cfg, inputs, out) -> Artifact` function. Config modules import nothing heavy at import
time, so validating a recipe never loads torch or vLLM; `run` imports what it needs.
"""

from __future__ import annotations

import importlib
import types
import typing
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.core.errors import UserError

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
    "score": "score",
    "kd": "kd",
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
    # What else the step's key covers (keys.step_inputs). Fields holding paths of files or directories the step
    # reads: their content is hashed. None (a user's step that does not say) means every string setting that names
    # an existing file or directory. Libraries (distribution names, as in pipeline.core.env) whose versions change what
    # the step writes. The version of the step's own code: bump it when a change alters what the step writes
    # (a user's step module is keyed by the sha256 of its source file instead).
    path_fields: ClassVar[tuple[str, ...] | None] = None
    libraries: ClassVar[tuple[str, ...]] = ()
    code_version: ClassVar[str] = "1"
    # Fields added after the step shipped, whose default keeps the old behaviour: left out of the key while they hold
    # their default, so that a new option re-runs no existing step (keys.step_inputs). Set, they are keyed as usual.
    keyed_when_set: ClassVar[tuple[str, ...]] = ()
    # Whether the step draws random numbers (sampling, training). One that does not is keyed without the seed, so
    # the runs of `distill run --seeds` share it whenever its inputs are the same.
    uses_seed: ClassVar[bool] = True

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value, info):
        """`limit: true` is refused, not read as 1: pydantic's lax mode takes a bool for an int or float (in every
        step's fields, nested settings such as `lora: {r: ...}` and lists of numbers), YAML writes one bare."""
        found = _bool_where_number(cls.model_fields[info.field_name].annotation, value)
        if found is not None:
            raise ValueError(f"{found[0]}{str(found[1]).lower()} is a boolean, not a number")
        return value

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

    def dtype_choice(self):
        """The dtype this step runs its model in (`pipeline.core.compute_dtype.DtypeChoice`), part of its key and manifest;
        None for a step that runs no model here."""
        return None

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

    def run_warnings(self) -> list[str]:
        """What `distill run` warns about before it starts (a hub dataset read without a pinned revision)."""
        return []

    def launch_machines(self) -> int:
        """How many machines this step's launch spans: above 1 for training with a multi-machine accelerate config,
        which `distill run` on every machine but machine 0 only joins (`join_launch`)."""
        return 1

    def join_launch(self, inputs, out) -> None:
        """On a machine other than machine 0: this machine's share of the step's multi-machine launch."""
        raise NotImplementedError(f"{self.uses} does not train across machines")

    def dataset_inputs(self) -> list[str]:
        """Names of earlier steps whose datasets this step reads."""
        return [self.input] if self.input else []


def _leaves(annotation) -> list:
    """The types a field annotation admits, unions and Annotated unwrapped (`int | None` -> [int, NoneType])."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _leaves(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in _leaves(arg)]
    return [annotation]


def _takes_bool(leaf) -> bool:
    if typing.get_origin(leaf) is Literal:
        return any(isinstance(v, bool) for v in typing.get_args(leaf))
    return leaf in (bool, Any, object) or isinstance(leaf, typing.TypeVar)


def _takes_number(leaf) -> bool:
    if typing.get_origin(leaf) is Literal:
        return any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in typing.get_args(leaf))
    return isinstance(leaf, type) and issubclass(leaf, (int, float)) and not issubclass(leaf, bool)


def _bool_where_number(annotation, value, path: str = "") -> tuple[str, bool] | None:
    """Where in `value` a bool stands for a number that `annotation` takes (and no bool), and that bool: the place
    is "" for the value itself, "r: " or "2: " inside it; None when there is none."""
    leaves = _leaves(annotation)
    if isinstance(value, bool):
        takes_number = any(_takes_number(leaf) for leaf in leaves) and not any(_takes_bool(leaf) for leaf in leaves)
        return (path, value) if takes_number else None
    for leaf in leaves:
        origin, args = typing.get_origin(leaf), typing.get_args(leaf)
        if isinstance(value, (list, tuple)) and origin in (list, tuple, set, frozenset) and args:
            items = args[:1] * len(value) if origin is not tuple or args[-1] is Ellipsis else args
            for index, (item, item_type) in enumerate(zip(value, items)):
                where = _bool_where_number(item_type, item, f"{path}{index}: ")
                if where is not None:
                    return where
        elif isinstance(value, dict) and origin is dict and len(args) == 2:
            for key, item in value.items():
                where = _bool_where_number(args[1], item, f"{path}{key}: ")
                if where is not None:
                    return where
        elif isinstance(value, dict) and isinstance(leaf, type) and issubclass(leaf, BaseModel):
            for name, info in leaf.model_fields.items():
                key = info.alias if info.alias in value else name
                if key in value:
                    where = _bool_where_number(info.annotation, value[key], f"{path}{key}: ")
                    if where is not None:
                        return where
    return None


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, (list, tuple)) else []


def _names_a_path(value: str) -> bool:
    """Whether a string setting of a step without `path_fields` names an existing file or directory (made one of
    the step's inputs, so hashed). Never `~` (a note "~" would hash the whole home directory; `~` is not expanded,
    and a value starting with it names no path here), and never the filesystem root or the home directory: a
    declared `path_fields` entry still hashes whatever it names."""
    import os
    from pathlib import Path

    # "." or ".." would make a whole tree (the repo, the workdir) an input
    if value.strip() in ("", ".", "..", "/") or "\n" in value or len(value) >= 4096 or value.startswith("~"):
        return False
    try:
        path = Path(value)
        if not path.exists():
            return False
        resolved = os.path.realpath(path)
        too_big = {os.path.realpath(os.sep), os.path.realpath(Path.home()), os.path.realpath(os.getcwd())}
        return resolved not in too_big
    except (RuntimeError, OSError, ValueError):  # a name too long, a NUL: names no path
        return False


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
