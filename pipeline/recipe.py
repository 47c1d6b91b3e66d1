"""YAML recipe -> validated `Recipe`, or a `RecipeError` naming the file, key path (and line) and reason.

Order of work: parse YAML (keeping each key's line), apply `-o key.path=value` overrides, resolve
`${dotted.path}` references against the document itself, validate the top level and each step with
its pydantic Config, then check what crosses steps (inputs and `step:NAME` models name earlier steps).
Nothing is written and nothing heavy is imported: a bad recipe fails in well under a second.
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
from pipeline.models import check_model_ref
from pipeline.steps import StepConfig, config_class

TOP_LEVEL_KEYS = {"name", "seed", "workdir", "models", "steps"}
STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
REFERENCE = re.compile(r"\$\{([^}]*)\}")


class RecipeError(UserError):
    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: invalid recipe\n" + "\n".join(f"  {p}" for p in problems))


@dataclass
class Recipe:
    name: str
    seed: int
    workdir: Path
    steps: dict[str, StepConfig]  # in run order
    source: str
    document: dict[str, Any] = field(repr=False, default_factory=dict)  # resolved YAML, for the record

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
    _check_cross_step(steps, report)

    if problems:
        raise RecipeError(source, problems)
    return Recipe(name=name, seed=seed, workdir=Path(workdir), steps=steps, source=source, document=doc)


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


def _check_cross_step(steps: dict[str, StepConfig], report) -> None:
    """Inputs name earlier dataset steps; `step:NAME` models name earlier model steps."""
    order = list(steps)
    for position, (step_name, cfg) in enumerate(steps.items()):
        earlier = order[:position]
        for dep in cfg.dataset_inputs():
            if dep not in steps:
                report(("steps", step_name, "input"), f"no step named {dep!r}")
            elif dep not in earlier:
                report(("steps", step_name, "input"), f"step {dep!r} runs later; inputs must name earlier steps")
        for ref in cfg.model_refs():
            if not isinstance(ref, str):
                continue
            at = ("steps", step_name) + _field_holding(cfg, ref)
            if ref.startswith("step:"):
                dep = ref.removeprefix("step:")
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
