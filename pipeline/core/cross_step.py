"""What crosses steps: the steps and models a step names, checked against the recipe's order (an input names an
earlier dataset step, `step:NAME` an earlier model step), and where in a step's settings each name stands, so that
an error points at the field."""

from __future__ import annotations

from pipeline.core.errors import UserError
from pipeline.core.models import STEP_PREFIX, check_model_ref
from pipeline.core.step import StepConfig


def check_cross_step(steps: dict[str, StepConfig], report, round_names: dict[str, str] | None = None) -> None:
    """Inputs name earlier dataset steps; `step:NAME` models name earlier model steps. `round_names`: one round of
    a block step (`merged@2`) -> the block step, checked in its place (the block is not expanded yet)."""
    order = list(steps)
    round_names = round_names or {}
    for position, (step_name, cfg) in enumerate(steps.items()):
        earlier = order[:position]
        for written in cfg.dataset_inputs():
            dep = round_names.get(written, written)
            if dep not in steps:
                report(("steps", step_name, "input"), f"no step named {written!r}")
            elif dep not in earlier:
                report(("steps", step_name, "input"), f"step {written!r} runs later; inputs must name earlier steps")
        for ref in cfg.model_refs():
            if not isinstance(ref, str):
                continue
            at = ("steps", step_name) + field_holding(cfg, ref)
            if ref.startswith("step:"):
                dep = round_names.get(ref.removeprefix("step:"), ref.removeprefix("step:"))
                if dep not in steps:
                    report(at, f"{ref}: no step named {dep!r}")
                elif dep not in earlier:
                    report(at, f"{ref}: step {dep!r} runs later; a model must come from an earlier step")
                elif steps[dep].produces != "model":
                    report(at, f"{ref}: step {dep!r} ({steps[dep].uses}) does not produce a model")
            else:
                try:
                    check_model_ref(ref)
                except UserError as e:
                    report(at, str(e))


def field_holding(cfg: StepConfig, ref: str) -> tuple:
    """The key path, inside a step, of the field that holds a model reference (for error messages)."""
    for field_name in type(cfg).model_fields:
        value = getattr(cfg, field_name)
        if value == ref:
            return (field_name,)
        if isinstance(value, list) and ref in value:
            return (field_name, value.index(ref))
    return ()


def model_references(cfg: StepConfig) -> list[str]:
    """The models a step reads, as written (hub ids, local paths, `step:NAME`)."""
    return [ref for ref in cfg.model_refs() if isinstance(ref, str)]


def step_references(cfg: StepConfig) -> list[str]:
    """The steps a step reads, as written: its dataset inputs and the NAME of each `step:NAME` model."""
    return list(cfg.dataset_inputs()) + [ref.removeprefix(STEP_PREFIX) for ref in model_references(cfg)
                                         if ref.startswith(STEP_PREFIX)]
