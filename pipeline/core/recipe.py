"""YAML recipe -> validated `Recipe`, or a `RecipeError` naming the file, key path (and line) and reason.

Order of work: parse YAML (keeping each key's line), apply `-o key.path=value` overrides, resolve
`${dotted.path}` references against the document itself, validate the top level and each step with
its pydantic Config, check a `rounds` block, check what crosses steps (inputs and `step:NAME` models name
earlier steps), then expand the rounds block into ordinary steps.
Nothing is written and nothing heavy is imported: a bad recipe fails in well under a second.

Strict input. The YAML is read by `pipeline.core.strict_yaml` (a key written twice, a recursive alias or aliases that
expand past its bounds are refused with the line); `${...}` references are followed along their chain, so one that
leads back to itself is refused as a cycle, and what references add to the document is bounded
(MAX_REFERENCE_SIZE); recipe and step names match their pattern whole, are at most MAX_NAME characters and are none
of the names `distill` itself puts in a workdir (`reserved_step_name`); a boolean is no number (`limit: true` is
refused where a number goes, see `pipeline.core.step.StepConfig`).

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

from pipeline.commands.compare import SEED_DIR
from pipeline.core import strict_yaml
from pipeline.core.errors import UserError
from pipeline.core.models import STEP_PREFIX, check_model_ref
from pipeline.core.step import StepConfig, config_class

TOP_LEVEL_KEYS = {"name", "seed", "workdir", "models", "steps", "rounds"}
ROUNDS_KEYS = {"steps", "count", "model"}
# Names are matched whole (fullmatch): `re.match` with `$` lets a trailing newline through.
STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
ROUND_STEP_NAME = re.compile(r"(?P<step>[A-Za-z0-9][A-Za-z0-9_-]*)@(?P<round>[1-9][0-9]*)")
MAX_NAME = 200  # a step's dirs are `<name>@<round>` and `.<name>@<round>.scratch`: inside a file name's 255 bytes
# What `distill` itself writes in a workdir, beside the step dirs. A step name starts with a letter or digit and has
# no dot, so `recipe.json`, `.lock`, `.distillery`, `.fingerprints.json` and `.<step>.tmp` / `.scratch` are never one;
# these are the names that could be: `distill report`'s page (pipeline.commands.run_report.REPORT_DIR) and the workdirs of
# `distill run --seeds` (`seed-N`, which `distill compare` and `distill report` read as seed runs).
REPORT_DIR = "run-report"
STEP_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # `load`, or a module path `mypkg.step`
REFERENCE = re.compile(r"\$\{([^}]*)\}")
MAX_REFERENCE_SIZE = 200_000  # values (and 64-character pieces of strings) that `${...}` references may add
MAX_REFERENCE_DEPTH = 128  # levels of nesting plus links of reference chains while resolving (bounds the recursion)


class RecipeError(UserError):
    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: invalid recipe\n" + "\n".join(f"  {p}" for p in problems))


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


def _shown(value: Any, limit: int = 60) -> str:
    """A value for an error message: repr (so a newline or control character shows), cut to `limit`."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def reserved_step_name(name: str) -> str | None:
    """Why `name` cannot be a step's (a path `distill` itself writes in the workdir), or None. Compared ignoring
    case: on a case-insensitive file system (macOS, Windows) `Run-Report` is the same directory."""
    if name.lower() == REPORT_DIR:
        return f"{REPORT_DIR!r} is reserved: `distill report` writes its page to WORKDIR/{REPORT_DIR}/"
    if SEED_DIR.fullmatch(name.lower()):
        return (f"{name!r} is reserved: `distill run --seeds` puts each seed's run in WORKDIR/seed-N/ (and "
                "`distill compare` reads such a directory as one)")
    return None


# ---------------------------------------------------------------- YAML with line numbers


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML strictly (`pipeline.core.strict_yaml`); also return {key path: line} so errors can point into the file."""
    try:
        return strict_yaml.parse(text)
    except yaml.YAMLError as e:
        raise RecipeError(source, [strict_yaml.describe(e, "invalid YAML: ")]) from None


# ---------------------------------------------------------------- overrides and references


def apply_override(doc: dict, override: str) -> None:
    """`steps.samples.n=8`: the value is read as YAML (8 -> int, true -> bool, [a, b] -> list)."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise UserError(f"override {override!r}: expected KEY.PATH=VALUE, e.g. steps.sample.n=8")
    try:
        value = strict_yaml.parse(raw)[0] if raw.strip() else ""
    except strict_yaml.Refused as e:  # a duplicate key, a recursive alias: refused as in the file
        raise UserError(f"override {override!r}: {strict_yaml.describe(e)}") from None
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


def _lookup(doc: Any, dotted: str) -> tuple[Any, tuple]:
    """The value at a dotted key path, and that path as the document spells it (list indices as ints)."""
    node, path = doc, ()
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node, path = node[part], path + (part,)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node, path = node[int(part)], path + (int(part),)
        else:
            raise KeyError(dotted)
    return node, path


class _TooLarge(Exception):
    pass


def resolve_references(doc: dict) -> tuple[dict, list[tuple[tuple, str]]]:
    """Replace `${a.b}` by the value at a.b. A whole-string reference keeps the value's type.

    A reference is followed along its chain: one that leads back to a reference being resolved is a cycle, reported
    where it is written. Each target is resolved once; what its copies add to the document is bounded by
    MAX_REFERENCE_SIZE, so a few references that each copy the one before cannot blow the document up. On a cycle or
    a missing key the reference resolves to None; past a bound `doc` itself is returned, unresolved."""
    problems: list[tuple[tuple, str]] = []
    resolved: dict[str, tuple[Any, int]] = {}  # reference -> (its value resolved, that value's size)
    added = 0  # the size of what references added so far

    def add(size: int, path: tuple) -> None:
        nonlocal added
        added += size
        if added > MAX_REFERENCE_SIZE:
            raise _TooLarge(path, f"references expand the recipe past {MAX_REFERENCE_SIZE} values (each ${{...}} "
                                  "copies what it names, with the references in it)")

    def resolve(value, path: tuple, chain: tuple[tuple[str, tuple], ...], depth: int = 0) -> tuple[Any, int]:
        """(value with its references replaced, its size: one per value, and one per 64 characters of a string).
        `chain`: the references being resolved, outermost first, each with the key path it is written at."""
        if depth > MAX_REFERENCE_DEPTH:
            raise _TooLarge(path, f"references nest the recipe more than {MAX_REFERENCE_DEPTH} levels deep")
        if isinstance(value, dict):
            items = {k: resolve(v, path + (k,), chain, depth + 1) for k, v in value.items()}
            return {k: v for k, (v, _) in items.items()}, 1 + sum(size for _, size in items.values())
        if isinstance(value, list):
            items = [resolve(v, path + (i,), chain, depth + 1) for i, v in enumerate(value)]
            return [v for v, _ in items], 1 + sum(size for _, size in items)
        if not isinstance(value, str) or "${" not in value:
            return value, 1 + (len(value) // 64 if isinstance(value, str) else 0)

        def target(ref: str) -> tuple[Any, int]:
            name = ref.strip()
            names = [link for link, _ in chain]
            if name in names:
                loop = chain[names.index(name):] + ((name, path),)
                cycle = (f"${{{name}}} is (or holds) the value this reference is written in" if len(loop) == 2 else
                         " -> ".join(f"${{{link}}}" for link, _ in loop))
                # reported where each reference of the loop is written: each resolves to None
                problems.extend((at, f"reference cycle ({cycle})") for _, at in loop)
                return None, 1
            if name not in resolved:
                try:
                    written, at = _lookup(doc, name)
                except KeyError:
                    problems.append((path, f"${{{ref}}} refers to a key that does not exist"))
                    return None, 1
                resolved[name] = resolve(written, at, chain + ((name, path),), depth + 1)
            value, size = resolved[name]
            add(size, path)
            return copy.deepcopy(value), size

        whole = REFERENCE.fullmatch(value)
        if whole:
            return target(whole.group(1))
        text = REFERENCE.sub(lambda m: str(target(m.group(1))[0]), value)
        add(len(text) // 64, path)
        return text, 1 + len(text) // 64

    try:
        return resolve(doc, (), ())[0], list(dict.fromkeys(problems))
    except _TooLarge as too_large:
        return doc, [too_large.args]


def _unshared(value: Any) -> Any:
    """A copy in which no dict or list appears twice (YAML aliases share them), so that an override or a resolved
    reference changes one place only. The YAML reader bounds the size of the copy."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


# ---------------------------------------------------------------- validation


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    source = str(path)
    text = strict_yaml.read_text(path, "recipe")
    raw, lines = _parse_yaml(text, source)
    if not isinstance(raw, dict):
        raise RecipeError(source, ["the recipe must be a YAML mapping with name, seed, models and steps"])
    raw = _unshared(raw)
    for override in overrides:
        apply_override(raw, override)
    pin_problems = _pinned_models(raw.get("models"))
    doc, ref_problems = resolve_references(raw)

    problems: list[str] = []

    unresolved: list[tuple] = []  # where a reference failed: what is checked there later would only repeat it

    def report(key_path: tuple, message: str) -> None:
        if any(key_path[:len(at)] == at for at in unresolved):
            return
        dotted = ".".join(p if isinstance(p, str) and p.isprintable() else repr(p) if isinstance(p, str) else str(p)
                          for p in key_path) or "(top level)"
        line = next((lines[key_path[:n]] for n in range(len(key_path), 0, -1) if key_path[:n] in lines), None)
        problems.append(f"{dotted}: {message}" + (f" (line {line})" if line else ""))

    for key_path, message in pin_problems + ref_problems:
        report(key_path, message)
    unresolved += [key_path for key_path, _ in ref_problems]
    if doc is raw:  # references past a bound: the rest would be checked unresolved
        raise RecipeError(source, problems)
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            report((key,), f"unknown key (allowed: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    name = doc.get("name")
    if not isinstance(name, str) or not STEP_NAME.fullmatch(name) or len(name) > MAX_NAME:
        report(("name",), f"required: a name made of letters, digits, '-' and '_', at most {MAX_NAME} characters"
                          + (f" (got {_shown(name)})" if name is not None else ""))
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        report(("seed",), f"must be an integer, got {seed!r}")
    workdir = doc.get("workdir")
    if workdir is None or workdir == "":
        workdir = f"runs/{name}"
    if not isinstance(workdir, str):  # [] or {} is no path: not silently the default workdir
        report(("workdir",), f"must be a path string, got {_shown(workdir)}")
    elif any(ord(c) < 32 or ord(c) == 127 for c in workdir):
        report(("workdir",), f"holds a control character (a newline, a tab, a NUL, ...): {_shown(workdir)}")
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
    folded: dict[str, str] = {}  # lower-cased name -> the step's name
    for step_name, spec in raw_steps.items():
        at = ("steps", step_name)
        if not isinstance(step_name, str) or not STEP_NAME.fullmatch(step_name) or len(step_name) > MAX_NAME:
            report(at, f"step names are letters, digits, '-' and '_', at most {MAX_NAME} characters (they become "
                       f"directory names); got {_shown(step_name)}")
            continue
        if reserved_step_name(step_name):
            report(at, reserved_step_name(step_name))
            continue
        if folded.setdefault(step_name.lower(), step_name) != step_name:
            report(at, f"differs from step {folded[step_name.lower()]!r} only in case: on a case-insensitive file "
                       "system (macOS, Windows) both would write one directory")
            continue
        if not isinstance(spec, dict):
            report(at, "must be a mapping with at least `uses`")
            continue
        if "uses" not in spec:
            report(at, "missing `uses` (the step type)")
            continue
        if not isinstance(spec["uses"], str) or not STEP_TYPE.fullmatch(spec["uses"]):
            report(at + ("uses",), f"a step type is a registered name (load, sample, ...) or a dotted module path "
                                   f"(mypkg.my_step); got {_shown(spec['uses'])}")
            continue
        try:
            config = config_class(spec["uses"])
        except UserError as e:
            report(at + ("uses",), str(e))
            continue
        except Exception as e:  # a user's step module that fails to import: say why, naming the module
            report(at + ("uses",), f"step type {spec['uses']!r}: importing it failed: {type(e).__name__}: {e}")
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
