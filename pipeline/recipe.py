"""YAML recipe -> validated `Recipe`, or a `RecipeError` naming the file, key path (and line) and reason.

Order of work: parse YAML (keeping each key's line), apply `-o key.path=value` overrides, resolve
`${dotted.path}` references against the document itself, validate the top level and each step with
its pydantic Config, check a `rounds` block, check what crosses steps (inputs and `step:NAME` models name
earlier steps), then expand the rounds block into ordinary steps.
Nothing is written and nothing heavy is imported: a bad recipe fails in well under a second.

Rounds. `rounds: {steps: [samples, graded, sft_data, sft, merged], count: 3, model: step:merged}` repeats a block
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

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import UserError
from pipeline.models import STEP_PREFIX, check_model_ref
from pipeline.steps import StepConfig, config_class

TOP_LEVEL_KEYS = {"name", "seed", "workdir", "models", "steps", "rounds"}
ROUNDS_KEYS = {"steps", "count", "model"}
STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
ROUND_STEP_NAME = re.compile(r"^(?P<step>[A-Za-z0-9][A-Za-z0-9_-]*)@(?P<round>[1-9][0-9]*)$")
REFERENCE = re.compile(r"\$\{([^}]*)\}")


class RecipeError(UserError):
    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: invalid recipe\n" + "\n".join(f"  {p}" for p in problems))


def round_step(step: str, round_number: int) -> str:
    """The name of a block step's expansion in one round: `samples@2`."""
    return f"{step}@{round_number}"


def split_round(name: str) -> tuple[str, int | None]:
    """`samples@2` -> ("samples", 2); a step outside any rounds block -> (name, None)."""
    match = ROUND_STEP_NAME.match(name)
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


@dataclass
class Recipe:
    name: str
    seed: int
    workdir: Path
    steps: dict[str, StepConfig]  # in run order; a rounds block is expanded (`samples@1`, `samples@2`, ...)
    source: str
    document: dict[str, Any] = field(repr=False, default_factory=dict)  # resolved YAML, for the record
    rounds: Rounds | None = None

    def dependencies(self, step: str) -> list[str]:
        """Earlier steps this step reads: its dataset inputs and the steps whose models it names."""
        cfg = self.steps[step]
        deps = list(cfg.dataset_inputs())
        deps += [ref.removeprefix("step:") for ref in cfg.model_refs() if ref.startswith("step:")]
        return list(dict.fromkeys(deps))


# ---------------------------------------------------------------- YAML with line numbers


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML safely; also return {key path: line} so errors can point into the file."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(source, [f"{where}invalid YAML: {problem}"]) from None
    lines: dict[tuple, int] = {}

    def walk(n, path):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key_path = path + (k.value,)
                lines[key_path] = k.start_mark.line + 1
                walk(v, key_path)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    if node is not None:
        walk(node, ())
    return data, lines


# ---------------------------------------------------------------- overrides and references


def apply_override(doc: dict, override: str) -> None:
    """`steps.samples.n=8`: the value is read as YAML (8 -> int, true -> bool, [a, b] -> list)."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserError(f"override {override!r}: expected KEY.PATH=VALUE, e.g. steps.sample.n=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = doc
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {override!r}: {'.'.join(parts[:i + 1])} is a {type(child).__name__}, "
                            "not a mapping")
        node = child
    node[parts[-1]] = value


def _lookup(doc: Any, dotted: str) -> Any:
    node = doc
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


def resolve_references(doc: dict) -> tuple[dict, list[tuple[tuple, str]]]:
    """Replace `${a.b}` by the value at a.b. A whole-string reference keeps the value's type."""
    problems: list[tuple[tuple, str]] = []

    def resolve(value, path, depth=0):
        if isinstance(value, dict):
            return {k: resolve(v, path + (k,), depth) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, path + (i,), depth) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        if depth > 10:
            problems.append((path, f"reference cycle in {value!r}"))
            return value

        def target(ref):
            try:
                return resolve(copy.deepcopy(_lookup(doc, ref.strip())), path, depth + 1)
            except KeyError:
                problems.append((path, f"${{{ref}}} refers to a key that does not exist"))
                return None

        whole = REFERENCE.fullmatch(value)
        if whole:
            return target(whole.group(1))
        return REFERENCE.sub(lambda m: str(target(m.group(1))), value)

    return resolve(doc, ()), problems


# ---------------------------------------------------------------- validation


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"{source}: cannot read recipe: {e.strerror}") from None
    raw, lines = _parse_yaml(text, source)
    if not isinstance(raw, dict):
        raise RecipeError(source, ["the recipe must be a YAML mapping with name, seed, models and steps"])
    for override in overrides:
        apply_override(raw, override)
    pin_problems = _pinned_models(raw.get("models"))
    doc, ref_problems = resolve_references(raw)

    problems: list[str] = []

    def report(key_path: tuple, message: str) -> None:
        dotted = ".".join(str(p) for p in key_path) or "(top level)"
        line = next((lines[key_path[:n]] for n in range(len(key_path), 0, -1) if key_path[:n] in lines), None)
        problems.append(f"{dotted}: {message}" + (f" (line {line})" if line else ""))

    for key_path, message in pin_problems + ref_problems:
        report(key_path, message)
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            report((key,), f"unknown key (allowed: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    name = doc.get("name")
    if not isinstance(name, str) or not STEP_NAME.match(name):
        report(("name",), "required: a name made of letters, digits, '-' and '_'")
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        report(("seed",), f"must be an integer, got {seed!r}")
    workdir = doc.get("workdir") or f"runs/{name}"
    if not isinstance(workdir, str):
        report(("workdir",), "must be a path string")
    models = doc.get("models", {})
    if not isinstance(models, dict):
        report(("models",), "must be a mapping of name -> model reference")
        models = {}
    for model_name, ref in models.items():
        try:
            check_model_ref(ref)
        except (UserError, TypeError) as e:
            report(("models", model_name), str(e))

    raw_steps = doc.get("steps")
    if not isinstance(raw_steps, dict) or not raw_steps:
        report(("steps",), "required: a mapping of step name -> step settings")
        raw_steps = {}
    steps: dict[str, StepConfig] = {}
    for step_name, spec in raw_steps.items():
        at = ("steps", step_name)
        if not STEP_NAME.match(str(step_name)):
            report(at, "step names are letters, digits, '-' and '_' (they become directory names)")
            continue
        if not isinstance(spec, dict):
            report(at, "must be a mapping with at least `uses`")
            continue
        if "uses" not in spec:
            report(at, "missing `uses` (the step type)")
            continue
        try:
            config = config_class(str(spec["uses"]))
        except UserError as e:
            report(at + ("uses",), str(e))
            continue
        try:
            steps[step_name] = config.model_validate(spec)
        except ValidationError as e:
            for err in e.errors():
                report(at + tuple(err["loc"]), err["msg"])
    rounds = None
    if "rounds" in doc:
        rounds, rounds_problems = _check_rounds(doc["rounds"], list(raw_steps), steps)
        for key_path, message in rounds_problems:
            report(key_path, message)
        if rounds is not None:
            _check_cross_step(steps, report, round_names=_round_names(rounds))
    else:
        _check_cross_step(steps, report)

    if problems:
        raise RecipeError(source, problems)
    if rounds is not None:
        steps, doc["steps"] = _expand_rounds(steps, raw_steps, rounds, report)
        if problems:  # a block step that does not validate with one round's references
            raise RecipeError(source, problems)
    return Recipe(name=name, seed=seed, workdir=Path(workdir), steps=steps, source=source, document=doc,
                  rounds=rounds)


def _pinned_models(models: Any) -> list[tuple[tuple, str]]:
    """`models: {base: {id: org/name, revision: COMMIT}}` -> `base: org/name@COMMIT`, in place, before references
    resolve (so `${models.base}` is the pinned reference)."""
    problems: list[tuple[tuple, str]] = []
    for name, ref in (models.items() if isinstance(models, dict) else []):
        if not isinstance(ref, dict):
            continue
        unknown = set(ref) - {"id", "revision"}
        if unknown or not isinstance(ref.get("id"), str) or not isinstance(ref.get("revision", ""), (str, int)):
            problems.append((("models", name), "a model is a reference string or a mapping {id: org/name, revision: "
                                               f"COMMIT}}, got {ref!r}"))
            continue
        models[name] = f"{ref['id']}@{ref['revision']}" if ref.get("revision") else ref["id"]
    return problems


def _check_cross_step(steps: dict[str, StepConfig], report, round_names: dict[str, str] | None = None) -> None:
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
            at = ("steps", step_name) + _field_holding(cfg, ref)
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


def _field_holding(cfg: StepConfig, ref: str) -> tuple:
    """The key path, inside a step, of the field that holds a model reference (for error messages)."""
    for field_name in type(cfg).model_fields:
        value = getattr(cfg, field_name)
        if value == ref:
            return (field_name,)
        if isinstance(value, list) and ref in value:
            return (field_name, value.index(ref))
    return ()


# ---------------------------------------------------------------- rounds


def _check_rounds(spec: Any, order: list[str], steps: dict[str, StepConfig]) -> tuple[Rounds | None, list]:
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
    start = next((ref for name in block for ref in _model_references(steps[name])
                  if not (ref.startswith(STEP_PREFIX) and ref.removeprefix(STEP_PREFIX) in block)), None)
    if start is None and count > 1:
        return None, [(("rounds",), "no step of the block reads a model from outside it, so round 2 cannot start "
                                    f"from round 1's {model}: the block needs a step (its sample step) that reads one")]
    rounds = Rounds(steps=tuple(block), count=count, model=model.removeprefix(STEP_PREFIX), start=start)
    found += _references_to_rounds(rounds, steps)
    return (None if found else rounds), found


def _model_references(cfg: StepConfig) -> list[str]:
    return [ref for ref in cfg.model_refs() if isinstance(ref, str)]


def _step_references(cfg: StepConfig) -> list[str]:
    """The steps a step reads, as written: its dataset inputs and the NAME of each `step:NAME` model."""
    return list(cfg.dataset_inputs()) + [ref.removeprefix(STEP_PREFIX) for ref in _model_references(cfg)
                                         if ref.startswith(STEP_PREFIX)]


def _references_to_rounds(rounds: Rounds, steps: dict[str, StepConfig]) -> list[tuple[tuple, str]]:
    """Inside the block a step names block steps plainly (each round reads its own); after it, one round's. (A
    step before the block that names one is refused by the cross-step check: it would read a later step.)"""
    found = []
    order = list(steps)
    for position, (step_name, cfg) in enumerate(steps.items()):
        inside = step_name in rounds.steps
        after = position > order.index(rounds.steps[-1])
        for name in _step_references(cfg):
            block_step, round_number = split_round(name)
            if block_step not in rounds.steps:
                continue
            at = ("steps", step_name) + _field_holding(cfg, name if name in cfg.dataset_inputs() else
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


def _round_names(rounds: Rounds) -> dict[str, str]:
    """Every round's name of every block step -> the block step."""
    return {round_step(name, k): name for name in rounds.steps for k in range(1, rounds.count + 1)}


def _expand_rounds(steps: dict[str, StepConfig], specs: dict[str, dict], rounds: Rounds,
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
    dataset_refs, model_refs = set(cfg.dataset_inputs()), set(_model_references(cfg))

    def rename(value):
        if isinstance(value, str) and value in dataset_refs:
            return datasets.get(value, value)
        if isinstance(value, str) and value in model_refs:
            return models.get(value, value)
        return value

    return {key: value if key == "uses" else [rename(v) for v in value] if isinstance(value, list) else rename(value)
            for key, value in spec.items()}
