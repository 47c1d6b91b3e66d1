"""YAML recipe -> validated `Recipe`, or a `RecipeError` naming the file, key path (and line) and reason.

Order of work: parse YAML (keeping each key's line), make the document (`pipeline.core.document`: `-o key.path=value`
overrides, pinned models, `${dotted.path}` references resolved against the document itself), validate the top
level and each step with its pydantic Config, check a `rounds` block (`pipeline.core.rounds`), check what crosses
steps (`pipeline.core.cross_step`: inputs and `step:NAME` models name earlier steps), then expand the rounds block
into ordinary steps.
Nothing is written and nothing heavy is imported: a bad recipe fails in well under a second.

Strict input. The YAML is read by `pipeline.core.strict_yaml` (a key written twice, a recursive alias or aliases that
expand past its bounds are refused with the line); `${...}` references are followed along their chain, so one that
leads back to itself is refused as a cycle, and what references add to the document is bounded; recipe and step
names match their pattern whole, are at most MAX_NAME characters and are none of the names `distill` itself puts in
a workdir (`reserved_step_name`); a boolean is no number (`limit: true` is refused where a number goes, see
`pipeline.core.step.StepConfig`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.core import strict_yaml
from pipeline.core.cross_step import check_cross_step
from pipeline.core.document import apply_override, pin_models, resolve_references, unshared
from pipeline.core.errors import UserError
from pipeline.core.models import check_model_ref
from pipeline.core.rounds import Rounds, check_rounds, expand_rounds, round_names
from pipeline.core.step import StepConfig, config_class
from pipeline.core.workdir import SEED_DIR

TOP_LEVEL_KEYS = {"name", "seed", "workdir", "models", "steps", "rounds"}
# Names are matched whole (fullmatch): `re.match` with `$` lets a trailing newline through.
STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MAX_NAME = 200  # a step's dirs are `<name>@<round>` and `.<name>@<round>.scratch`: inside a file name's 255 bytes

# What `distill` itself writes in a workdir, beside the step dirs. A step name starts with a letter or digit and has
# no dot, so `recipe.json`, `.lock`, `.distillery`, `.fingerprints.json` and `.<step>.tmp` / `.scratch` are never one;
# these are the names that could be: `distill report`'s page (pipeline.commands.run_report.page.REPORT_DIR) and the
# workdirs of `distill run --seeds` (`seed-N`, which `distill compare` and `distill report` read as seed runs).
REPORT_DIR = "run-report"
STEP_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # `load`, or a module path `mypkg.step`


class RecipeError(UserError):
    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: invalid recipe\n" + "\n".join(f"  {p}" for p in problems))


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


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML strictly (`pipeline.core.strict_yaml`); also return {key path: line} so errors can point into the
    file."""
    try:
        return strict_yaml.parse(text)
    except yaml.YAMLError as e:
        raise RecipeError(source, [strict_yaml.describe(e, "invalid YAML: ")]) from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe at `path`, with `overrides` (`key.path=value`) applied, validated and its rounds expanded; a
    RecipeError listing every problem found (each naming its key path and line) otherwise."""
    source = str(path)
    raw, lines = _parse_yaml(strict_yaml.read_text(path, "recipe"), source)
    if not isinstance(raw, dict):
        raise RecipeError(source, ["the recipe must be a YAML mapping with name, seed, models and steps"])
    raw = unshared(raw)
    for override in overrides:
        apply_override(raw, override)
    pin_problems = pin_models(raw.get("models"))
    doc, ref_problems = resolve_references(raw)
    problems = _Problems(lines)
    for key_path, message in pin_problems + ref_problems:
        problems.report(key_path, message)
    problems.unresolved += [key_path for key_path, _ in ref_problems]
    if doc is raw:  # references past a bound: the rest would be checked unresolved
        raise RecipeError(source, problems.found)
    name, seed, workdir = _check_top_level(doc, problems.report)
    raw_steps, steps = _validate_steps(doc.get("steps"), problems.report)
    rounds = None
    if "rounds" in doc:
        rounds, rounds_problems = check_rounds(doc["rounds"], list(raw_steps), steps)
        for key_path, message in rounds_problems:
            problems.report(key_path, message)
        if rounds is not None:
            check_cross_step(steps, problems.report, round_names=round_names(rounds))
    else:
        check_cross_step(steps, problems.report)

    if problems.found:
        raise RecipeError(source, problems.found)
    if rounds is not None:
        steps, doc["steps"] = expand_rounds(steps, raw_steps, rounds, problems.report)
        if problems.found:  # a block step that does not validate with one round's references
            raise RecipeError(source, problems.found)
    return Recipe(name=name, seed=seed, workdir=Path(workdir), steps=steps, source=source, document=doc,
                  rounds=rounds)


class _Problems:
    """The problems found in a recipe, each as `key.path: message (line N)`."""

    def __init__(self, lines: dict[tuple, int]):
        self.lines = lines  # {key path: line}, from the YAML
        self.found: list[str] = []
        self.unresolved: list[tuple] = []  # where a reference failed: what is checked there later would only repeat it

    def report(self, key_path: tuple, message: str) -> None:
        if any(key_path[:len(at)] == at for at in self.unresolved):
            return
        dotted = ".".join(p if isinstance(p, str) and p.isprintable() else repr(p) if isinstance(p, str) else str(p)
                          for p in key_path) or "(top level)"
        line = next((self.lines[key_path[:n]] for n in range(len(key_path), 0, -1) if key_path[:n] in self.lines),
                    None)
        self.found.append(f"{dotted}: {message}" + (f" (line {line})" if line else ""))


def _check_top_level(doc: dict, report) -> tuple[Any, Any, Any]:
    """Check the keys beside `steps` (`name`, `seed`, `workdir`, `models`); (name, seed, workdir) as they are to be
    used (the default workdir is `runs/<name>`)."""
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
    return name, seed, workdir


def _validate_steps(raw_steps: Any, report) -> tuple[dict, dict[str, StepConfig]]:
    """Each step of `steps:` validated with its type's Config: (the steps as written, or {} where `steps:` is not a
    mapping of them; the steps that validate, in order)."""
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
    return raw_steps, steps
