"""A recipe's `rounds` block: checked, then expanded into ordinary steps.

`rounds: {steps: [samples, graded, sft_data, sft, merged], count: 3, model: step:merged}` repeats a block
of consecutive steps. Loading expands it into ordinary steps named `STEP@ROUND` (`samples@1` ... `merged@3`; a
name a user's step cannot have), so the runner, content keys, resume and `distill status` treat them like any
other step. In round k a block step reads round k's steps (`input: samples` -> `samples@k`, `step:sft` ->
`step:sft@k`) and whatever the block reads from outside it is shared by all rounds, except the block's starting
model: the first model a block step reads from outside the block (in step order). From round 2 on, every
reference to it inside the block becomes the previous round's `model` step (`step:merged@1` in round 2), so
round k samples from, and trains on top of, round k-1's model; its key holds that step's key (its lineage). A
step after the block names one round's step (`step:merged@2`); the bare name would be ambiguous and is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipeline.core.cross_step import field_holding, model_references, step_references
from pipeline.core.models import STEP_PREFIX
from pipeline.core.step import StepConfig

ROUNDS_KEYS = {"steps", "count", "model"}
ROUND_STEP_NAME = re.compile(r"(?P<step>[A-Za-z0-9][A-Za-z0-9_-]*)@(?P<round>[1-9][0-9]*)")


def round_step(step: str, round_number: int) -> str:
    """The name of a block step's expansion in one round: `samples@2`."""
    return f"{step}@{round_number}"


def split_round(name: str) -> tuple[str, int | None]:
    """`samples@2` -> ("samples", 2); a step outside any rounds block -> (name, None)."""
    match = ROUND_STEP_NAME.fullmatch(name)
    return (match["step"], int(match["round"])) if match else (name, None)


@dataclass(frozen=True)
class Rounds:
    """A recipe's `rounds` block, checked."""

    steps: tuple[str, ...]  # the block as written, in run order
    count: int
    model: str  # the block step whose model the next round starts from
    start: str | None  # the block's starting model (round 1's); None when no block step reads one from outside

    def starting_model(self, round_number: int) -> str | None:
        """The model round `round_number` starts from: the block's own in round 1, else the previous round's."""
        if round_number == 1:
            return self.start
        return STEP_PREFIX + round_step(self.model, round_number - 1)

    def models_by_round(self) -> list[str | None]:
        """Round k's model at index k; index 0 is the model round 1 starts from."""
        return [self.start] + [STEP_PREFIX + round_step(self.model, k) for k in range(1, self.count + 1)]

    def title(self, round_number: int) -> str:
        """The line `distill run` and `distill status` print before a round's first step."""
        start = self.starting_model(round_number)
        return f"round {round_number}/{self.count}" + (f", from {start}" if start else "")


def check_rounds(spec: Any, order: list[str], steps: dict[str, StepConfig]) -> tuple[Rounds | None, list]:
    """The `rounds` block checked against the steps as written: (the block, or None when it is not usable; the
    problems found, as (key path, message))."""
    found: list[tuple[tuple, str]] = []
    if not isinstance(spec, dict):
        return None, [(("rounds",), "must be a mapping {steps: [STEP, ...], count: N, model: step:STEP}")]
    found += [(("rounds", key), f"unknown key (allowed: {', '.join(sorted(ROUNDS_KEYS))})")
              for key in spec if key not in ROUNDS_KEYS]
    block, count, model = spec.get("steps"), spec.get("count"), spec.get("model")
    if not isinstance(block, list) or not block or not all(isinstance(name, str) for name in block):
        return None, found + [(("rounds", "steps"), "required: a list of the names of the steps each round repeats")]
    for index, name in enumerate(block):
        if name not in order:
            found.append((("rounds", "steps", index), f"no step named {name!r} (steps: {', '.join(order)})"))
        elif block.index(name) != index:
            found.append((("rounds", "steps", index), f"{name!r} is listed more than once"))
    if found:
        return None, found
    positions = [order.index(name) for name in block]
    if block != order[positions[0]:positions[0] + len(block)]:
        spanned = order[min(positions):max(positions) + 1]
        found.append((("rounds", "steps"), "the block must be consecutive steps of `steps`, in their order (from "
                                           f"{spanned[0]} to {spanned[-1]}, `steps` has {', '.join(spanned)})"))
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        found.append((("rounds", "count"), f"required: how many rounds, an integer >= 1 (got {count!r})"))
    if not all(name in steps for name in block):
        return None, found  # a block step that failed validation is reported under its own key
    block_models = [STEP_PREFIX + name for name in block if steps[name].produces == "model"]
    if model not in block_models:
        found.append((("rounds", "model"), "required: step:STEP, the block step whose model the next round starts "
                                           f"from (got {model!r}; the block's model steps: "
                                           f"{', '.join(block_models) or 'none'})"))
    if found:
        return None, found
    start = next((ref for name in block for ref in model_references(steps[name])
                  if not (ref.startswith(STEP_PREFIX) and ref.removeprefix(STEP_PREFIX) in block)), None)
    if start is None and count > 1:
        return None, [(("rounds",), "no step of the block reads a model from outside it, so round 2 cannot start "
                                    f"from round 1's {model}: the block needs a step (its sample step) that reads one")]
    rounds = Rounds(steps=tuple(block), count=count, model=model.removeprefix(STEP_PREFIX), start=start)
    found += _references_to_rounds(rounds, steps)
    return (None if found else rounds), found


def _references_to_rounds(rounds: Rounds, steps: dict[str, StepConfig]) -> list[tuple[tuple, str]]:
    """Inside the block a step names block steps plainly (each round reads its own); after it, one round's. (A
    step before the block that names one is refused by the cross-step check: it would read a later step.)"""
    found = []
    order = list(steps)
    for position, (step_name, cfg) in enumerate(steps.items()):
        inside = step_name in rounds.steps
        after = position > order.index(rounds.steps[-1])
        for name in step_references(cfg):
            block_step, round_number = split_round(name)
            if block_step not in rounds.steps:
                continue
            at = ("steps", step_name) + field_holding(cfg, name if name in cfg.dataset_inputs() else
                                                       STEP_PREFIX + name)
            if inside and round_number is not None:
                found.append((at, f"{name!r}: inside the rounds block, name block steps without @ROUND (round k "
                                  f"reads round k's {block_step})"))
            elif after and round_number is None:
                found.append((at, f"{name!r} is repeated by `rounds` ({rounds.count} rounds), so the name is "
                                  f"ambiguous: name one round, {round_step(name, 1)} ... "
                                  f"{round_step(name, rounds.count)}"))
            elif after and round_number > rounds.count:
                found.append((at, f"{name!r}: there is no round {round_number} (rounds.count is {rounds.count})"))
    return found


def round_names(rounds: Rounds) -> dict[str, str]:
    """Every round's name of every block step -> the block step."""
    return {round_step(name, k): name for name in rounds.steps for k in range(1, rounds.count + 1)}


def expand_rounds(steps: dict[str, StepConfig], specs: dict[str, dict], rounds: Rounds,
                   report) -> tuple[dict[str, StepConfig], dict[str, dict]]:
    """The steps (configs, and their resolved specs for the record) with the block repeated `count` times, each
    round's references to block steps and to the starting model rewritten (see the module docstring)."""
    expanded: dict[str, StepConfig] = {}
    expanded_specs: dict[str, dict] = {}
    for name in steps:
        if name not in rounds.steps:
            expanded[name], expanded_specs[name] = steps[name], specs[name]
            continue
        if name != rounds.steps[0]:
            continue  # the whole block goes in at its first step
        for round_number in range(1, rounds.count + 1):
            datasets = {block_step: round_step(block_step, round_number) for block_step in rounds.steps}
            models = {STEP_PREFIX + old: STEP_PREFIX + new for old, new in datasets.items()}
            if round_number > 1:
                models[rounds.start] = rounds.starting_model(round_number)
            for block_step in rounds.steps:
                cfg, spec = steps[block_step], specs[block_step]
                new_name = round_step(block_step, round_number)
                expanded_specs[new_name] = _rewrite_references(cfg, spec, datasets, models)
                try:
                    expanded[new_name] = type(cfg).model_validate(expanded_specs[new_name])
                except ValidationError as e:
                    for err in e.errors():
                        report(("steps", block_step) + tuple(err["loc"]), f"round {round_number}: {err['msg']}")
    return expanded, expanded_specs


def _rewrite_references(cfg: StepConfig, spec: dict, datasets: dict[str, str], models: dict[str, str]) -> dict:
    """A step's spec with the values that name what it reads renamed: its dataset inputs by `datasets`, its
    model references by `models` (wherever they stand: `model`, `models: [...]`, an evaluate `baseline`)."""
    dataset_refs, model_refs = set(cfg.dataset_inputs()), set(model_references(cfg))

    def rename(value):
        if isinstance(value, str) and value in dataset_refs:
            return datasets.get(value, value)
        if isinstance(value, str) and value in model_refs:
            return models.get(value, value)
        return value

    return {key: value if key == "uses" else [rename(v) for v in value] if isinstance(value, list) else rename(value)
            for key, value in spec.items()}
